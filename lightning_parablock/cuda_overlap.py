"""Keeping the device busy while deltas move: turn timing by CUDA events, copies on a side stream.

On a GPU the host runs ahead of the device, so a wall-clock turn time needs a device-wide synchronize
after every turn, which stalls the very overlap ParaBlock is about. :class:`TurnTimer` records CUDA
events instead and reads them once, when the round ends. Device-to-host copies of deltas go on a side
stream into pinned host memory, ordered after the compute stream by an event, so they run beside the
next client's kernels; whoever reads the host copy waits on the copy's event, never on the device.

Profiler ranges ``parablock.compute`` (a client's turn), ``parablock.copy`` (deltas leaving the device)
and ``parablock.exchange`` (the communication thread's work) let a trace show the overlap. On CPU the
same code runs with wall-clock timing and plain copies.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor
from torch.profiler import record_function

COMPUTE_RANGE = "parablock.compute"
COPY_RANGE = "parablock.copy"
EXCHANGE_RANGE = "parablock.exchange"


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
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def copy_to_host(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Optional["torch.cuda.Event"]]:
    """Start copying ``tensors`` to pinned host memory on a side stream; return the copies and their event.

    CPU tensors come back as they are (and no event). The copies may be read once the event has completed;
    the sources are marked as used by the side stream, so the allocator does not reuse their memory early.
    """
    if not any(t.is_cuda for t in tensors.values()):
        return dict(tensors), None
    with record_function(COPY_RANGE):
        device = next(t.device for t in tensors.values() if t.is_cuda)
        stream = _side_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # after the kernels that produced them
        copies = {}
        with torch.cuda.stream(stream):
            for name, tensor in tensors.items():
                if not tensor.is_cuda:
                    copies[name] = tensor
                    continue
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                tensor.record_stream(stream)
                copies[name] = host
        done = torch.cuda.Event()
        done.record(stream)
    return copies, done


_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]
