"""Fresh names for what a rewrite adds: value and node names not yet used anywhere in a model."""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["Namer"]


class Namer:
    """Hands out value and node names not yet used anywhere in the model (subgraphs included)."""

    def __init__(self, graph: ir.Graph) -> None:
        self._taken: set[str] = set()
        for scope in (graph, *graph.subgraphs()):
            self._taken.update(v.name for v in (*scope.inputs, *scope.outputs) if v.name)
            self._taken.update(scope.initializers)
        for node in graph.all_nodes():
            self._taken.add(node.name or "")
            self._taken.update(v.name for v in node.outputs if v.name)

    def __call__(self, base: str) -> str:
        name, suffix = base, 1
        while name in self._taken:
            name, suffix = f"{base}_{suffix}", suffix + 1
        self._taken.add(name)
        return name
