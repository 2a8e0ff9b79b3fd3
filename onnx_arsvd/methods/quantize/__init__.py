"""Quantization by onnxruntime's own quantizers."""
