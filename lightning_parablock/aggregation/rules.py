"""Pure aggregation rules over client deltas keyed by client id: Σ w_i Δ^i, median, trimmed mean, clipping.

Every rule accumulates in fp32 whatever the dtype on the wire, so bf16 deltas do not lose their small
components here. None of them decides about non-finite deltas: that is :mod:`.nonfinite`'s one policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Optional

import torch
from torch import Tensor

Deltas = Mapping[int, Mapping[str, Tensor]]


def _fixed(shape: torch.Size, free_dim: Optional[int]) -> tuple[int, ...]:
    """``shape`` without the dimension allowed to differ between clients."""
    return tuple(size for dim, size in enumerate(shape) if dim != free_dim)


def check_deltas(deltas: Deltas, free_dim: Callable[[str], Optional[int]] = lambda name: None) -> list[str]:
    """The tensor names every client sent; a ValueError when clients disagree on names or shapes.

    ``free_dim(name)`` is a dimension of that tensor that may differ between clients (FLoRA's
    per-client LoRA rank), or ``None`` when the whole shape must agree.
    """
    if not deltas:
        raise ValueError("Cannot aggregate a round with no client deltas.")
    clients = sorted(deltas)
    reference = deltas[clients[0]]
    names = list(reference)
    for client in clients:
        delta = deltas[client]
        if list(delta) != names:
            raise ValueError(f"Client {client} sent tensors {list(delta)}, expected {names}.")
        for name in names:
            if _fixed(delta[name].shape, free_dim(name)) != _fixed(reference[name].shape, free_dim(name)):
                # add_ would broadcast a wrong shape silently
                raise ValueError(
                    f"Client {client} sent {name!r} of shape {tuple(delta[name].shape)},"
                    f" expected {tuple(reference[name].shape)}."
                )
    return names


def weighted_sum(deltas: Deltas, weights: Mapping[int, float]) -> dict[str, Tensor]:
    """Σ_i w_i Δ^i in fp32 (the weights as given: normalize them for a mean)."""
    names = check_deltas(deltas)
    first = deltas[min(deltas)]
    total = {name: torch.zeros_like(first[name], dtype=torch.float32) for name in names}
    add_weighted(total, deltas, weights)
    return total


def add_weighted(total: Mapping[str, Tensor], deltas: Deltas, weights: Mapping[int, float]) -> None:
    """``total += Σ_i w_i Δ^i`` in place, clients in ascending id: each delta is read once, nothing is copied
    (a partial sum of the clients one process holds)."""
    if not set(deltas) <= set(weights):
        raise ValueError(f"Deltas from clients {sorted(deltas)} but weights for clients {sorted(weights)}.")
    for client in sorted(deltas):
        for name, tensor in deltas[client].items():
            total[name].add_(tensor, alpha=weights[client])


def _stacked(deltas: Deltas, name: str) -> Tensor:
    return torch.stack([deltas[client][name].float() for client in sorted(deltas)])


def coordinate_median(deltas: Deltas) -> dict[str, Tensor]:
    """Coordinate-wise median (the lower one for an even count); unweighted, robust to < half bad clients."""
    return {name: _stacked(deltas, name).median(dim=0).values for name in check_deltas(deltas)}


def trimmed_mean(deltas: Deltas, trim_fraction: float) -> dict[str, Tensor]:
    """Coordinate-wise mean after dropping the ``trim_fraction`` largest and smallest values; unweighted."""
    names = check_deltas(deltas)
    trimmed = math.floor(trim_fraction * len(deltas))
    result = {}
    for name in names:
        ordered = _stacked(deltas, name).sort(dim=0).values
        result[name] = ordered[trimmed : len(deltas) - trimmed].mean(dim=0)
    return result


def clip_scale(delta: Mapping[str, Tensor], max_norm: float) -> float:
    """The factor that brings a client's whole block delta to an L2 norm of at most ``max_norm`` (1 when it is
    within it already)."""
    norm = float(torch.sqrt(sum(t.float().pow(2).sum() for t in delta.values())))
    return min(1.0, max_norm / norm) if norm > 0 else 1.0


def clip_by_norm(delta: Mapping[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """Scale a client's whole block delta so its L2 norm is at most ``max_norm``."""
    scale = clip_scale(delta, max_norm)
    return {name: t.float() * scale for name, t in delta.items()}
