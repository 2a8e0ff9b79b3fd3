"""Everything that runs onnxruntime: sessions, calibration, verification, sensitivity, timing, the guard."""
