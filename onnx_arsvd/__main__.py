"""``python -m onnx_arsvd`` runs the CLI."""

import sys

from onnx_arsvd.cli import main

sys.exit(main())
