#!/usr/bin/env bash
# Quick start: install onnx-arsvd into .venv, then compress the shipped Fashion-MNIST MLP,
# verify it on its 10,000-image test split in onnxruntime, benchmark both models, and print the report.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e .
mkdir -p build
.venv/bin/onnx-arsvd compress models/fashion_mlp.onnx -o build/fashion_mlp.arsvd.onnx \
    --tau 0.9 --data models/fashion_test.npz --bench --report build/fashion_mlp.report.json
