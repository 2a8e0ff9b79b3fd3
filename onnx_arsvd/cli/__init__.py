"""The ``onnx-arsvd`` command line: options, commands, and errors as one line."""
