"""Host memory for a round's sum, used again round after round instead of new pages every round.

On a CPU host a new tensor the size of a block gets fresh pages, and touching each 4 KB page for the first time
costs the kernel more than the sum itself: at a Llama 3-8B block (1.75 GB of fp32) about 0.8 of the 1.1 CPU
seconds of a one-client round (``benchmarks/exchange_throughput.py``). Exchanges run one at a time on the
communication thread, and the round boundary reads an aggregate only while it applies it, so the memory of one
round's sum can hold a later round's: the boundary hands it back (``ExchangeResult.release_aggregate``) and the next
exchange takes it and writes its first client's term over it (no zeroing pass: ``Aggregator.sum_into``). Nothing
is handed back if the boundary never applies a result; then a new sum is made, as before.

Pinned memory (the deltas came from a GPU) is never kept here: torch's own cache of pinned buffers reuses it
already, and it alone knows when the upload that reads an aggregate on a CUDA stream has finished.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

_HOST = torch.device("cpu")


def _keep() -> None:
    """What releasing a sum nobody reuses does: nothing (its memory goes when its last reference does)."""


class SumBuffers:
    """At most one free fp32 host vector, the largest handed back, for the next round's sum to be made in.

    Memory: one block of fp32 (the largest block exchanged) stays allocated between exchanges, the size of the
    aggregate the boundary held anyway.
    """

    def __init__(self) -> None:
        self._free: Optional[Tensor] = None
        self._lock = threading.Lock()  # taken on the communication thread, handed back on the main thread

    def take(self, numel: int, pin_memory: bool = False) -> tuple[Tensor, Callable[[], None]]:
        """An fp32 host vector of ``numel`` values holding whatever an earlier sum left (the sum overwrites it:
        ``Aggregator.sum_into``), and what to call once nothing reads it any more."""
        if pin_memory:
            return torch.empty(numel, dtype=torch.float32, device=_HOST, pin_memory=True), _keep
        with self._lock:
            free, self._free = self._free, None
        if free is None or free.numel() < numel:
            free = torch.empty(numel, dtype=torch.float32, device=_HOST)
        return free[:numel], first_call_only(lambda: self._keep_if_largest(free), self._lock)

    def _keep_if_largest(self, vector: Tensor) -> None:
        if self._free is None or self._free.numel() < vector.numel():
            self._free = vector


def first_call_only(release: Callable[[], None], lock: threading.Lock) -> Callable[[], None]:
    """``release`` run on the first call only, under ``lock`` (memory is handed back on the main thread and taken
    on the communication thread): a second call must not free memory a later round's sum holds."""
    pending = [release]

    def release_once() -> None:
        with lock:
            if pending:
                pending.pop()()

    return release_once
