"""Rank selection under a budget: the fewest parameters that keep accuracy, without retraining.

The search is made of values: the data split into parts (:mod:`~onnx_arsvd.search.parts`), a judge that runs a
candidate against the original and gives the budget's verdict with its prediction bound
(:mod:`~onnx_arsvd.search.judge`), the global allocation's frontier built once
(:mod:`~onnx_arsvd.search.space`), strategies that pick a point on it (:mod:`~onnx_arsvd.search.strategies`),
and the held-out frontier for the report (:mod:`~onnx_arsvd.search.frontier`); :func:`run_search` returns a
frozen :class:`SearchResult`.
"""
