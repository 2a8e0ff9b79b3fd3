"""Pure numpy/scipy: factorizations, rank rules, loss curves, the knapsack. No ONNX, no runtime."""
