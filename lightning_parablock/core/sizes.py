"""Bytes, counted one way everywhere: what a tensor holds as stored (``numel × element_size``).

The timeline's bytes moved, the memory a client holds and the modelled link time all read sizes from here, so a
codec that changes a dtype changes every figure the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Union

from torch import Tensor
from torch.optim import Optimizer


def nbytes_of(tensors: Union[Mapping[str, Tensor], Iterable[Tensor]]) -> int:
    """Bytes of ``tensors`` (a name -> tensor mapping or any iterable of tensors) as stored."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return sum(t.numel() * t.element_size() for t in values)


def optimizer_state_nbytes(optimizer: Optimizer) -> int:
    """Bytes of an optimizer's per-parameter state (AdamW: two moments and a step count)."""
    return nbytes_of(value for state in optimizer.state.values() for value in state.values() if isinstance(value, Tensor))
