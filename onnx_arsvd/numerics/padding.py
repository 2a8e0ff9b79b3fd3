"""Padding positions: which token positions of a batch are real, so that padding neither fits nor judges.

Sentences of different lengths are batched by padding them to one length, and the model is told which
positions are real by an attention mask (batch x sequence, 1 = token, 0 = padding). The model still
computes an activation and an output at every padded position, but nothing downstream reads them. Left
in, they would outweigh the real tokens: 78% of the positions of MiniLM's polarity sentences, padded to
128, are padding. So every layer's input Gram leaves out the rows at padded positions, and every
comparison of outputs (error, cosine, a layer's response) leaves out the outputs there.

The mask is a model input named ``attention_mask`` or ``input_mask`` (the exporters' names), 2-D, of
zeros and ones. An activation or output is masked when its first two axes are the mask's (batch,
sequence); a 2-D output is masked only when its declared second dim is the mask's named sequence dim
(question answering's start and end logits, batch x sequence), since a shape alone cannot tell a sequence
axis from a class axis. Anything else (a pooled embedding, class scores, an activation already flattened
to rows) is used whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from onnx_arsvd.errors import InvalidInputError

__all__ = ["MASK_NAMES", "check_positions", "drop_padding", "masks", "real_positions", "sequence_outputs",
           "zero_padding"]

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


def check_positions(positions: np.ndarray, where: str) -> None:
    """Refuse a sample with no real position (an all-zero mask): nothing of it could be compared or fitted, and a
    comparison over nothing would read as perfect."""
    empty = np.flatnonzero(~positions.any(axis=1))
    if empty.size:
        raise InvalidInputError(f"{where}: sample {int(empty[0])} has an attention mask of all zeros "
                                f"({empty.size} such sample{'s' if empty.size > 1 else ''}): it has no token to "
                                "compare; leave it out of the data")


class _Declared(Protocol):
    """A graph input or output as onnxruntime declares it (``NodeArg``): symbolic dims are strings."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> Sequence[int | str | None] | None: ...


def sequence_outputs(inputs: Sequence[_Declared], outputs: Sequence[_Declared]) -> list[bool]:
    """For each output, whether it is a 2-D batch x sequence output by its declared dims: its second dim is
    the symbolic dim that the mask input declares as its sequence axis. Unnamed or fixed dims say nothing."""
    mask = next((i for i in inputs if i.name in MASK_NAMES), None)
    shape = list(mask.shape or ()) if mask is not None else []
    sequence = shape[1] if len(shape) == 2 and isinstance(shape[1], str) and shape[1] else None
    return [sequence is not None and len(o.shape or ()) == 2 and list(o.shape or ())[1] == sequence
            for o in outputs]


def masks(array: np.ndarray, positions: np.ndarray | None, sequence: bool = False) -> bool:
    """Whether ``positions`` (from :func:`real_positions`) apply to the array: its first two axes are theirs,
    and it has a third axis or is a ``sequence`` output (:func:`sequence_outputs`)."""
    return (positions is not None and (array.ndim >= 3 or (sequence and array.ndim == 2))
            and array.shape[:2] == positions.shape)


def drop_padding(array: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    """The array's entries at real positions (first two axes merged), or the whole array when it is not
    laid out batch x sequence x ..."""
    return array[positions] if masks(array, positions) else array


def zero_padding(array: np.ndarray, positions: np.ndarray | None, sequence: bool = False) -> np.ndarray:
    """The array with its padded positions set to zero (the same shape), or unchanged when it is not laid
    out batch x sequence x ... (``sequence``: as in :func:`masks`)."""
    if not masks(array, positions, sequence):
        return array
    assert positions is not None
    return np.where(positions.reshape(positions.shape + (1,) * (array.ndim - 2)), array, 0)
