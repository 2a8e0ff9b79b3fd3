"""``python -m onnx_arsvd`` runs the CLI."""

import sys

try:
    from onnx_arsvd.cli.main import main
except KeyboardInterrupt:  # Ctrl-C before main() could catch it
    print("onnx-arsvd: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
