"""Pure aggregation rules over client deltas keyed by client id: Σ w_i Δ^i, median, trimmed mean, clipping.

Every rule accumulates in fp32 whatever the dtype on the wire, so bf16 deltas do not lose their small
components here. The weighted sum finds non-finite deltas while it adds them (each delta is read from memory once);
none of the rules decides about them: that is :mod:`.nonfinite`'s one policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Optional

import torch
from torch import Tensor

from lightning_parablock.aggregation.nonfinite import all_finite

Deltas = Mapping[int, Mapping[str, Tensor]]

SLICE_VALUES = 1 << 20
"""Values per slice when a host tensor is added into a sum (4 MB of fp32): each slice is checked for NaN/Inf right
after it is added, while it is still in the cache, so checking costs no second read of the delta from memory."""


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
    """Σ_i w_i Δ^i in fp32 (the weights as given: normalize them for a mean) over finite deltas."""
    total = zeros_like_delta(deltas)
    add_weighted(total, deltas, weights)
    return total


def zeros_like_delta(deltas: Deltas) -> dict[str, Tensor]:
    """A zero fp32 tensor for every name the clients sent, to sum into, where the deltas are: in pinned host memory
    when they are (staged from a GPU), so the sum comes from torch's cache of pinned buffers instead of new pages
    every round, and its upload at the round boundary does not block the host."""
    names = check_deltas(deltas)
    first = deltas[min(deltas)]
    return {
        name: torch.zeros(
            first[name].shape, dtype=torch.float32, device=first[name].device, pin_memory=first[name].is_pinned()
        )
        for name in names
    }


def add_weighted(
    total: Mapping[str, Tensor], deltas: Deltas, weights: Mapping[int, float], overwrite: bool = False
) -> dict[int, str]:
    """``total += Σ_i w_i Δ^i`` in place, clients in ascending id, and the clients whose delta holds NaN or Inf,
    with the first such tensor's name, found in the same pass: each delta is read from memory once, nothing is
    copied (a partial sum of the clients one process holds). A non-finite delta is added too: whoever gets any
    back leaves that sum and adds the clients it keeps again.

    ``overwrite``: ``total`` holds whatever an earlier round left (memory reused): ``total = Σ_i w_i Δ^i``, the first
    client's term written rather than added, so the memory needs no zeroing pass first (zeros with no client)."""
    if not set(deltas) <= set(weights):
        raise ValueError(f"Deltas from clients {sorted(deltas)} but weights for clients {sorted(weights)}.")
    non_finite: dict[int, str] = {}
    for position, client in enumerate(sorted(deltas)):
        for name, tensor in deltas[client].items():
            finite = _add_checking(total[name], tensor, weights[client], write=overwrite and position == 0)
            if not finite and client not in non_finite:
                non_finite[client] = name
    if overwrite:
        first = deltas[min(deltas)] if deltas else {}
        for name in set(total) - set(first):  # nothing written there: it holds an earlier round's values
            total[name].zero_()
    return non_finite


def _add_checking(total: Tensor, delta: Tensor, weight: float, write: bool = False) -> bool:
    """``total += weight × delta`` (``total = weight × delta`` when ``write``); whether ``delta`` is finite. A large
    contiguous host tensor goes slice by slice, each checked while it is in the cache; anything else is added, then
    checked (a GPU reads fast enough, and a check per slice there would wait for the device each time)."""
    on_host = delta.device.type == "cpu" and delta.is_contiguous() and total.is_contiguous()
    if not on_host or delta.numel() <= SLICE_VALUES:
        _add_or_write(total, delta, weight, write)
        return all_finite(delta)
    flat_total, flat_delta = total.view(-1), delta.view(-1)
    finite = True
    for start in range(0, flat_delta.numel(), SLICE_VALUES):
        piece = flat_delta[start : start + SLICE_VALUES]
        _add_or_write(flat_total[start : start + SLICE_VALUES], piece, weight, write)
        finite = finite and all_finite(piece)
    return finite


def _add_or_write(total: Tensor, delta: Tensor, weight: float, write: bool) -> None:
    """``total += weight × delta``, or ``total = weight × delta``: the same fp32 product either way (read exactly
    from bf16 too), so a written first term equals an added one (a zero may differ in sign only)."""
    if not write:
        total.add_(delta, alpha=weight)
    elif torch.promote_types(delta.dtype, total.dtype) == delta.dtype:  # the product in delta's dtype, as add_'s
        torch.mul(delta, weight, out=total)  # one pass
    else:  # a bf16 product would be rounded to bf16: widen first (the slice is in the cache by then)
        total.copy_(delta).mul_(weight)


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
