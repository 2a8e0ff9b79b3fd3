"""The ``compress`` and ``inspect`` runs as stages over frozen values (behind :mod:`onnx_arsvd.api`)."""
