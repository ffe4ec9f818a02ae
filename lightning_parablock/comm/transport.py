"""The contract every transport keeps: one round's uploads go in, the round's aggregate comes out.

A transport is how the deltas of the clients one process hosts meet the other clients' deltas: in memory when
one process hosts every client (:mod:`.in_memory`), in torch.distributed collectives between ranks
(:mod:`.distributed`), or through a federation server such as Flower's. It runs on the communication thread
(:class:`~lightning_parablock.comm.worker.CommWorker`), one exchange at a time, and never touches the model.

What a run uses is chosen by a :class:`TransportChoice` (the ``transport`` of ``ParaBlockCallback``): it says which
member of how many this process is (a rank of a job, a site of a federation), which decides the clients it
hosts, and builds the transport once the strategy knows the model's blocks.
:class:`~lightning_parablock.comm.by_processes.ByProcesses`, the default, exchanges in memory with one process and
by collectives with several.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.comm.codecs import EncodedDelta
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.core.sizes import nbytes_of

BlockLayout = list[tuple[str, torch.Size]]
"""The names and shapes of one block's parameters, in the model's order."""


def views_by_layout(flat: Tensor, layout: BlockLayout) -> dict[str, Tensor]:
    """A block's tensors as views of one flat vector (no copy: a pinned or reused sum stays where it is)."""
    tensors, offset = {}, 0
    for name, shape in layout:
        numel = shape.numel()
        tensors[name] = flat[offset : offset + numel].view(shape)
        offset += numel
    return tensors


class CommunicationError(RuntimeError):
    """The exchange of a round failed or timed out on the communication thread."""


@dataclass(frozen=True)
class RoundUploads:
    """What this process sends for one round: each hosted sender's encoded delta and unnormalized weight."""

    round: int
    block: int
    deltas: Mapping[int, EncodedDelta]  # by client id; host tensors once the worker has staged them
    weights: Mapping[int, float]  # 1, or the client's sample count (the aggregator's weighting)


@dataclass
class ExchangeResult:
    """What one round's exchange produced and what it cost."""

    round: int
    block: int
    aggregate: Optional[dict[str, Tensor]]  # Δ_t in fp32, on the host, until released; None when no sender was kept
    skipped_clients: list[int]  # left out for a non-finite delta
    upload_bytes: dict[int, int]  # per client, as encoded
    download_bytes: int  # the aggregate, received by each client
    link_seconds: float  # modelled (simulated link) or measured (a real one): upload then download
    work_seconds: float  # measured: this process's copies, aggregation and waiting on the thread
    release_aggregate: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)
    """Called by the round boundary once it has applied ``aggregate`` and reads it no more: the transport may make
    a later round's sum in its memory (:mod:`~lightning_parablock.comm.sum_buffers`)."""


@runtime_checkable
class Transport(Protocol):
    """Runs one round's exchange on the communication thread and returns its result."""

    def exchange(self, uploads: RoundUploads, stop: threading.Event) -> ExchangeResult:
        """Send ``uploads``, return the round's aggregate; return early, with anything, once ``stop`` is set."""
        ...

    def describe_stall(self, round_index: int) -> str:
        """What to add to a timeout's message: who never joined the exchange of ``round_index``."""
        ...


@dataclass(frozen=True)
class ExchangeContext:
    """What a transport is built from, once the strategy has set up the federation."""

    aggregator: Aggregator
    link: SimulatedLink
    timeout_s: float
    placement: list[int]  # the member (rank, site) hosting each client
    member: int  # this process's member index
    members: int  # how many members the clients are placed on
    block_layout: Callable[[int], BlockLayout]
    device: torch.device  # the training device (CUDA deltas are staged to pinned host memory)
    extra: dict[str, object] = field(default_factory=dict)  # what a transport of one's own needs besides


class TransportChoice:
    """Which transport a run uses: the membership that places clients, and the transport itself.

    Subclass it for a transport of your own (Flower's sites are one);
    :class:`~lightning_parablock.comm.by_processes.ByProcesses` is the default.
    """

    def membership(self, rank: int, world_size: int) -> tuple[int, int]:
        """``(this process's member index, number of members)`` among which clients are placed."""
        return rank, world_size

    def build(self, context: ExchangeContext) -> Transport:
        """The transport of this process; every process of the run calls it (collectives may be created here)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def result_after_modelled_link(
    uploads: RoundUploads,
    aggregate: Optional[dict[str, Tensor]],
    skipped_clients: list[int],
    upload_bytes: dict[int, int],
    link: SimulatedLink,
    started_at: float,
    stop: Optional[threading.Event],
    release_aggregate: Callable[[], None] = lambda: None,
) -> ExchangeResult:
    """Wait out what is left of the modelled link time after the real work, and describe the exchange.

    Every sender uploads its own delta and downloads the aggregate (fp32; FLoRA's stacks are N deltas wide).
    """
    download_bytes = nbytes_of(aggregate) if aggregate is not None else 0
    link_seconds = 0.0
    if upload_bytes:
        slowest_upload = max(link.transfer_seconds(n) for n in upload_bytes.values())
        link_seconds = slowest_upload + link.transfer_seconds(download_bytes)
    work_seconds = time.perf_counter() - started_at
    if link_seconds > work_seconds:  # an Event, not sleep(): shutdown must not wait for a modelled link
        (stop or threading.Event()).wait(link_seconds - work_seconds)
    return ExchangeResult(
        round=uploads.round,
        block=uploads.block,
        aggregate=aggregate,
        skipped_clients=skipped_clients,
        upload_bytes=upload_bytes,
        download_bytes=download_bytes,
        link_seconds=link_seconds,
        work_seconds=work_seconds,
        release_aggregate=release_aggregate,
    )
