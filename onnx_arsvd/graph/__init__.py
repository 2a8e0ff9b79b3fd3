"""The graph, with onnx_ir only: finding layers, exposing activations. Runs nothing."""
