"""The one policy for non-finite deltas: a client whose delta holds NaN or Inf never reaches the global model.

Under ``"raise"`` the exchange fails naming the client; under ``"skip"`` the client is left out of the round's
aggregate (and drops all its pending deltas: what it trained since was built on the poisoned view). Every
aggregator and both transports decide through :func:`kept_clients`, so they decide the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Optional

import torch
from torch import Tensor

NonFinitePolicy = Literal["raise", "skip"]
_AMINMAX_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class NonFiniteDeltaError(FloatingPointError):
    """A client sent a delta with NaN or Inf; aggregating it would poison the global model."""


def all_finite(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds no NaN and no Inf, read from its extremes: ``aminmax`` is one pass that propagates
    NaN and allocates nothing, about 10× faster on one thread than ``isfinite(tensor).all()`` with its mask (the
    comm thread checks every client's block, 1.75 GB per client for a 2-layer block of Llama 3-8B)."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    if tensor.dtype not in _AMINMAX_DTYPES:  # float8 and the like: no aminmax kernel
        return bool(torch.isfinite(tensor).all())
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def non_finite_clients(deltas: Mapping[int, Mapping[str, Tensor]]) -> dict[int, Optional[str]]:
    """Clients whose delta holds NaN or Inf, with the first offending tensor's name."""
    found: dict[int, Optional[str]] = {}
    for client in sorted(deltas):
        bad = next((name for name, t in deltas[client].items() if not all_finite(t)), None)
        if bad is not None:
            found[client] = bad
    return found


def kept_clients(
    senders: Sequence[int],
    bad: Mapping[int, Optional[str]],
    policy: NonFinitePolicy,
    describe: Callable[[int], str] = lambda client: f"Client {client}",
) -> list[int]:
    """The senders an aggregate keeps under ``policy``; raises when it keeps none.

    ``bad`` maps each sender with a non-finite delta to its first bad tensor's name (``None`` when unknown,
    e.g. a flag from another rank); ``describe`` names a client in the error (with its rank, say).
    """
    if bad and policy == "raise":
        client = min(bad)
        tensor = f" for {bad[client]!r}" if bad[client] is not None else ""
        raise NonFiniteDeltaError(
            f"{describe(client)} sent a non-finite delta{tensor} (Aggregator(nonfinite='skip') leaves such clients"
            " out instead)."
        )
    kept = [client for client in sorted(senders) if client not in bad]
    if senders and not kept:
        raise NonFiniteDeltaError(f"Every client of the round sent a non-finite delta: {sorted(bad)}.")
    return kept
