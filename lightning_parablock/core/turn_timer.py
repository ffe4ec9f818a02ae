"""Seconds of compute per client turn: wall clock on CPU, CUDA events on a GPU, read once per round."""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch.profiler import record_function

from lightning_parablock.core.device_copies import cuda_event

COMPUTE_RANGE = "parablock.compute"


class TurnTimer:
    """Seconds of compute per client turn: wall clock on CPU, CUDA events on a GPU read at round end."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._started: Optional[object] = None  # perf_counter value or CUDA event of the open turn
        self._range: Optional[record_function] = None
        self._turns: dict[int, tuple[object, object]] = {}

    def start(self) -> None:
        self._range = record_function(COMPUTE_RANGE)
        self._range.__enter__()
        self._started = _now(self.cuda)

    def stop(self, client: Optional[int]) -> None:
        """End the open turn; ``client`` None drops it (an idle turn)."""
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if client is not None and self._started is not None:
            self._turns[client] = (self._started, _now(self.cuda))
        self._started = None

    def resolve(self) -> dict[int, float]:
        """Seconds of every turn stopped since the last call (waits for the last turn's kernels on a GPU)."""
        turns, self._turns = self._turns, {}
        if not self.cuda:
            return {client: end - start for client, (start, end) in turns.items()}
        for _, end in turns.values():
            end.synchronize()
        return {client: start.elapsed_time(end) / 1000.0 for client, (start, end) in turns.items()}


def _now(cuda: bool) -> object:
    if not cuda:
        return time.perf_counter()
    event = cuda_event(timing=True)
    event.record()
    return event
