"""Padding positions: which token positions of a batch are real, so that padding neither fits nor judges.

Sentences of different lengths are batched by padding them to one length, and the model is told which
positions are real by an attention mask (batch x sequence, 1 = token, 0 = padding). The model still
computes an activation and an output at every padded position, but nothing downstream reads them. Left
in, they would outweigh the real tokens: 78% of the positions of MiniLM's polarity sentences, padded to
128, are padding. So every layer's input Gram leaves out the rows at padded positions, and every
comparison of outputs (error, cosine, a layer's response) leaves out the outputs there.

The mask is a model input named ``attention_mask`` or ``input_mask`` (the exporters' names), 2-D, of
zeros and ones. An activation or output is masked when its first two axes are the mask's (batch,
sequence); anything else (a pooled embedding, class scores, an activation already flattened to rows)
is used whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["MASK_NAMES", "drop_padding", "masks", "real_positions", "zero_padding"]

MASK_NAMES = ("attention_mask", "input_mask")


def real_positions(feed: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The feed's real token positions (boolean, batch x sequence), or None when it has no 0/1 attention
    mask or no position is padding."""
    for name in MASK_NAMES:
        mask = feed.get(name)
        if mask is None:
            continue
        mask = np.asarray(mask)
        if mask.ndim != 2 or not np.all((mask == 0) | (mask == 1)):
            return None  # not a padding mask (an additive float mask, a 4-D one): no guessing
        return None if mask.all() else mask.astype(bool)
    return None


def masks(array: np.ndarray, positions: np.ndarray | None) -> bool:
    """Whether ``positions`` (from :func:`real_positions`) apply to the array: its first two axes are theirs."""
    return positions is not None and array.ndim >= 3 and array.shape[:2] == positions.shape


def drop_padding(array: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    """The array's entries at real positions (first two axes merged), or the whole array when it is not
    laid out batch x sequence x ..."""
    return array[positions] if masks(array, positions) else array


def zero_padding(array: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    """The array with its padded positions set to zero (the same shape), or unchanged when it is not laid
    out batch x sequence x ..."""
    if not masks(array, positions):
        return array
    assert positions is not None
    return np.where(positions.reshape(positions.shape + (1,) * (array.ndim - 2)), array, 0)
