"""Server aggregation: Δ_t from the round's client deltas, in fp32.

The paper aggregates with the weighted mean Σ_i w_i Δ^i_t. For cross-silo runs where a
client may send garbage, :class:`Aggregator` adds per-client norm clipping, the
coordinate-wise median and the trimmed mean, and a policy for non-finite deltas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from lightning_parablock.argument_checks import check_choice, check_float, check_positive

Deltas = Mapping[int, Mapping[str, Tensor]]
AggregationMethod = Literal["mean", "median", "trimmed_mean"]
NonFinitePolicy = Literal["raise", "skip"]


def _fixed(shape: torch.Size, free_dim: Optional[int]) -> tuple[int, ...]:
    """``shape`` without the dimension allowed to differ between clients."""
    return tuple(size for dim, size in enumerate(shape) if dim != free_dim)


class NonFiniteDeltaError(FloatingPointError):
    """A client sent a delta with NaN or Inf; aggregating it would poison the global model."""


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


def non_finite_clients(deltas: Deltas) -> dict[int, str]:
    """Clients whose delta holds NaN or Inf, with the first offending tensor's name."""
    found = {}
    for client in sorted(deltas):
        bad = next((name for name, t in deltas[client].items() if not torch.isfinite(t).all()), None)
        if bad is not None:
            found[client] = bad
    return found


def weighted_mean(deltas: Deltas, weights: Mapping[int, float]) -> dict[str, Tensor]:
    """Σ_i w_i Δ^i over clients keyed by id.

    Accumulation is in fp32 whatever the dtype on the wire, so bf16 deltas do not lose
    their small components here.
    """
    names = check_deltas(deltas)
    if set(deltas) != set(weights):
        raise ValueError(f"Deltas from clients {sorted(deltas)} but weights for clients {sorted(weights)}.")
    bad = non_finite_clients(deltas)
    if bad:
        client, name = next(iter(bad.items()))
        raise NonFiniteDeltaError(f"Client {client} sent a non-finite delta for {name!r}.")
    return _weighted_sum(deltas, weights, names)


def _weighted_sum(deltas: Deltas, weights: Mapping[int, float], names: list[str]) -> dict[str, Tensor]:
    """Σ_i w_i Δ^i in fp32, for deltas already checked."""
    first = deltas[min(deltas)]
    aggregate = {name: torch.zeros_like(first[name], dtype=torch.float32) for name in names}
    for client in sorted(deltas):
        for name in names:
            aggregate[name].add_(deltas[client][name].float(), alpha=weights[client])
    return aggregate


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


def clip_by_norm(delta: Mapping[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """Scale a client's whole block delta so its L2 norm is at most ``max_norm``."""
    norm = torch.sqrt(sum(t.float().pow(2).sum() for t in delta.values()))
    scale = min(1.0, max_norm / float(norm)) if float(norm) > 0 else 1.0
    return {name: t.float() * scale for name, t in delta.items()}


@dataclass
class AggregateResult:
    aggregate: dict[str, Tensor]
    skipped_clients: list[int]  # non-finite deltas left out under the "skip" policy


class Aggregator:
    """How the server combines a round's deltas.

    Args:
        method: ``"mean"`` (weighted by the strategy's weights; the paper), ``"median"``
            (coordinate-wise) or ``"trimmed_mean"``; the robust two ignore the weights.
        clip_norm: clip each client's block delta to this L2 norm before combining.
        trim_fraction: share of clients dropped at each end by ``"trimmed_mean"``, in [0, 0.5).
        nonfinite: a client whose delta holds NaN/Inf makes the exchange fail (``"raise"``) or is
            left out of this round with a warning (``"skip"``); it never reaches the global model.
    """

    def __init__(
        self,
        method: AggregationMethod = "mean",
        clip_norm: Optional[float] = None,
        trim_fraction: float = 0.1,
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        self.method = check_choice("method", method, ("mean", "median", "trimmed_mean"))
        self.clip_norm = None if clip_norm is None else check_positive("clip_norm", clip_norm)
        self.trim_fraction = check_float("trim_fraction", trim_fraction, minimum=0.0, maximum=0.5, max_open=True)
        self.nonfinite = check_choice("nonfinite", nonfinite, ("raise", "skip"))

    def __call__(self, deltas: Deltas, weights: Mapping[int, float]) -> AggregateResult:
        names = check_deltas(deltas)
        bad = non_finite_clients(deltas)
        if bad and self.nonfinite == "raise":
            client, name = next(iter(bad.items()))
            raise NonFiniteDeltaError(
                f"Client {client} sent a non-finite delta for {name!r} (Aggregator(nonfinite='skip') leaves"
                " such clients out instead)."
            )
        kept = {client: delta for client, delta in deltas.items() if client not in bad}
        if not kept:
            raise NonFiniteDeltaError(f"Every client of the round sent a non-finite delta: {sorted(bad)}.")
        if self.clip_norm is not None:
            kept = {client: clip_by_norm(delta, self.clip_norm) for client, delta in kept.items()}
        if self.method == "median":
            aggregate = coordinate_median(kept)
        elif self.method == "trimmed_mean":
            aggregate = trimmed_mean(kept, self.trim_fraction)
        else:
            total = sum(weights[client] for client in kept)
            aggregate = _weighted_sum(kept, {client: weights[client] / total for client in kept}, names)
        return AggregateResult(aggregate, sorted(bad))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(method={self.method!r}, clip_norm={self.clip_norm},"
            f" trim_fraction={self.trim_fraction}, nonfinite={self.nonfinite!r})"
        )
