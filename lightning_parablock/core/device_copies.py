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

from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor
from torch.profiler import record_function

COPY_RANGE = "parablock.copy"
EXCHANGE_RANGE = "parablock.exchange"


def cuda_event(timing: bool = False) -> "torch.cuda.Event":
    """A CUDA event whose ``synchronize`` sleeps instead of spinning a core: the host threads that wait here
    (the communication thread, the round's end) share the CPU with the data loader and the main thread."""
    return torch.cuda.Event(enable_timing=timing, blocking=True)


class HostCopier:
    """Starts copies of CUDA tensors to pinned host memory on a side stream of its own (one per device, made on
    first use). Each owner, the communication worker and a federation that offloads deltas, has its own: no
    module-level registry of streams. (torch hands streams out of a per-device pool, so two copiers may share
    one; their copies then queue one after the other, still off the compute stream.)
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, "torch.cuda.Stream"] = {}

    def side_stream(self, device: torch.device) -> "torch.cuda.Stream":
        """The stream this copier's copies from ``device`` run on, never the compute stream."""
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def copy(self, tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Optional["torch.cuda.Event"]]:
        """Start copying ``tensors`` to pinned host memory on the side stream; return the copies and their event.

        CPU tensors come back as they are (and no event). The copies may be read once the event has completed;
        the sources are marked as used by the side stream, so the allocator does not reuse their memory early.
        """
        if not any(t.is_cuda for t in tensors.values()):
            return dict(tensors), None
        with record_function(COPY_RANGE):
            device = next(t.device for t in tensors.values() if t.is_cuda)
            stream = self.side_stream(device)
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
            done = cuda_event()
            done.record(stream)
        return copies, done
