"""Server aggregation: Δ_t = Σ_i w_i Δ^i_t over the round's participants, in fp32."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


class NonFiniteDeltaError(FloatingPointError):
    """A client sent a delta with NaN or Inf; aggregating it would poison the global model."""


def weighted_mean(
    deltas: Mapping[int, Mapping[str, Tensor]], weights: Mapping[int, float]
) -> dict[str, Tensor]:
    """Weighted mean of per-client block deltas keyed by client id.

    Every client must send the same tensors. Accumulation is in fp32 whatever the
    dtype on the wire, so bf16 deltas do not lose their small components here.
    """
    if not deltas:
        raise ValueError("Cannot aggregate a round with no client deltas.")
    if set(deltas) != set(weights):
        raise ValueError(f"Deltas from clients {sorted(deltas)} but weights for clients {sorted(weights)}.")
    clients: Sequence[int] = sorted(deltas)
    names = list(deltas[clients[0]])
    aggregate = {name: torch.zeros_like(deltas[clients[0]][name], dtype=torch.float32) for name in names}
    for client in clients:
        delta = deltas[client]
        if list(delta) != names:
            raise ValueError(f"Client {client} sent tensors {list(delta)}, expected {names}.")
        for name in names:
            tensor = delta[name]
            if tensor.shape != aggregate[name].shape:  # add_ would broadcast a wrong shape silently
                raise ValueError(
                    f"Client {client} sent {name!r} of shape {tuple(tensor.shape)},"
                    f" expected {tuple(aggregate[name].shape)}."
                )
            if not torch.isfinite(tensor).all():
                raise NonFiniteDeltaError(f"Client {client} sent a non-finite delta for {name!r}.")
            aggregate[name].add_(tensor.float(), alpha=weights[client])
    return aggregate
