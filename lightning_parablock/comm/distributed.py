"""The torch.distributed transport: client deltas on every rank meet in collectives.

Each rank hosts a fixed share of the clients (:func:`place_clients`). An exchange is two collectives
on a process group of the transport's own (Lightning uses the default group from the main thread
every batch; a collective on it from the communication thread would deadlock):

1. a small all-reduce of who sent a delta and with which weight, so every rank normalizes the same weights;
2. the weighted sum of the deltas by all-reduce (in shared memory between ranks of one machine,
   :mod:`.shared_memory`), with one flag per client behind it for a delta that held NaN or
   Inf (found while it was added), so every rank takes the same decision about non-finite clients; or, for the
   robust aggregators that need every delta (median, trimmed mean), the finiteness of each delta in the first
   all-reduce and an all-gather of the kept deltas.

The group is always gloo over host copies, also when training runs on GPUs under NCCL: the deltas reach the
host on a side stream (pinned, ordered by an event, see :mod:`~lightning_parablock.core.device_copies`), so the
exchange never issues work on a CUDA stream. A collective from this thread on a CUDA stream would order itself
after the compute stream and, through ``work.wait()``, the compute stream after it; with the default group's
per-turn agreement (NCCL on the main thread) queued in the other order on another rank, both would hang. A
50-150 MB/s link does not need NCCL's bandwidth; what it needs is never to stall compute. With a CUDA model the
weighted sum lands in pinned memory, so the round boundary uploads it without blocking the host.

Both collectives are issued with ``async_op=True`` and waited for with ``comm_timeout``; the group's own timeout
is :data:`GROUP_TIMEOUT_MARGIN_S` longer, so the library's error naming the stalled rank always comes first. A
rank that fails publishes why in the job's key-value store; :class:`FaultWatch` on every other rank reads it and
stops that rank at once, naming the failed rank and round, instead of leaving it in a collective.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_parablock._compat import default_store
from lightning_parablock.aggregation.aggregator import Aggregator, normalized_weights
from lightning_parablock.aggregation.nonfinite import kept_clients, non_finite_clients
from lightning_parablock.comm.codecs import as_encoded, decode_delta, encoded_nbytes, summands_of
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.comm.shared_memory import SharedMemorySum
from lightning_parablock.comm.sum_buffers import SumBuffers
from lightning_parablock.comm.transport import (
    BlockLayout,
    ExchangeResult,
    RoundUploads,
    result_after_modelled_link,
    views_by_layout,
)

GROUP_TIMEOUT_MARGIN_S = 60.0
"""How much longer than ``comm_timeout`` the exchange group's own timeout is: the transport's wait, whose error
names the ranks that never joined, must end first."""

_HOST = torch.device("cpu")


def _misfit(delta: Mapping[str, Tensor], layout: BlockLayout) -> Optional[str]:
    """What keeps ``delta`` from fitting the block ``layout`` describes, or ``None`` when it fits."""
    expected = [name for name, _ in layout]
    if list(delta) != expected:
        return f"holds tensors {list(delta)}, expected {expected}"
    for name, shape in layout:
        if delta[name].shape != shape:
            return f"holds {name!r} of shape {tuple(delta[name].shape)}, expected {tuple(shape)}"
    return None


class CollectiveTransport:
    """Exchanges deltas with the other ranks; called on the communication thread (see ``comm.transport``).

    The aggregator decides how: a rule that :attr:`~lightning_parablock.aggregation.aggregator.Aggregator.reduces_from_partial_sums`
    adds this rank's kept clients into one flat partial sum (in place, each delta read once) and the ranks
    all-reduce it; any other rule sees every kept delta, gathered from every rank, in ascending client id.

    Args:
        group: the transport's own process group, from :func:`new_exchange_group`.
        aggregator: the server's rule.
        link: the modelled link, waited out after the real work.
        placement: the rank hosting each client.
        layout: the names and shapes of a block's parameters, for ranks without a sender this round.
        timeout_s: longest wait for one collective (``comm_timeout``).
        pin_memory: put the weighted sum in pinned host memory (the model is on a GPU: its upload then does not
            block the host).
        shared: add up the partial sums in shared memory (ranks of one machine, :meth:`SharedMemorySum.between`)
            instead of gloo's all-reduce; ``None``: gloo.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        aggregator: Aggregator,
        link: SimulatedLink,
        placement: Sequence[int],
        layout: Callable[[int], BlockLayout],
        timeout_s: float,
        pin_memory: bool = False,
        shared: Optional[SharedMemorySum] = None,
    ) -> None:
        self.group = group
        self.aggregator = aggregator
        self.link = link
        self.placement = list(placement)
        self.layout = layout
        self.timeout = timedelta(seconds=timeout_s)
        self.pin_memory = pin_memory
        self.sums = SumBuffers()
        self.shared = shared
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._store = default_store()

    def exchange(self, uploads: RoundUploads, stop: threading.Event) -> ExchangeResult:
        start = time.perf_counter()
        round_index, layout = uploads.round, self.layout(uploads.block)
        sums_in_parts = self.aggregator.reduces_from_partial_sums
        with torch.no_grad():
            # What is counted is what each client sends; the mean reads fp32 and bf16 as sent, the rest is decoded.
            encoded = {client: as_encoded(uploads.deltas[client]) for client in sorted(uploads.deltas)}
            read = summands_of if sums_in_parts and self.aggregator.reads_payloads_as_sent else decode_delta
            mine = {client: read(delta) for client, delta in encoded.items()}
            # A rule that sums in parts finds non-finite deltas while it adds them; the others check every delta first.
            bad_here = {} if sums_in_parts else non_finite_clients(mine)
            # Explicit dtypes and devices everywhere on this thread: Lightning's half-precision step sets the
            # process-wide default dtype, which this thread sees too (a byte count of 262148 would read 262144 in
            # bf16, and overflow in fp16).
            misfits = {client: _misfit(delta, layout) for client, delta in mine.items()}
            status = torch.zeros(len(self.placement), 5, dtype=torch.float64, device=_HOST)
            for client in mine:
                status[client] = torch.tensor(
                    [
                        1.0,
                        float(uploads.weights[client]),
                        float(client in bad_here),
                        encoded_nbytes(encoded[client]),
                        float(misfits[client] is not None),
                    ],
                    dtype=torch.float64,
                    device=_HOST,
                )
            self._store.set(f"parablock/joined/{round_index}/{self.rank}", "1")
            self._wait(dist.all_reduce(status, group=self.group, async_op=True), round_index)
            senders = [c for c in range(len(self.placement)) if status[c, 0] > 0]
            self._refuse_misfits(senders, status, misfits)
            raw_weights = {c: float(status[c, 1]) for c in senders}
            release: Callable[[], None] = lambda: None
            if sums_in_parts:
                aggregate, bad, release = self._sum(mine, senders, raw_weights, layout, round_index)
            else:
                bad = {c: bad_here.get(c) for c in senders if status[c, 2] > 0}
                kept = kept_clients(senders, bad, self.aggregator.nonfinite, self._describe)
                weights = normalized_weights(raw_weights, kept) if kept else {}
                mine_kept = {client: mine[client] for client in sorted(set(mine) & set(kept))}
                aggregate = self._gather(mine_kept, kept, weights, raw_weights, layout, round_index) if kept else None
        upload_bytes = {client: int(status[client, 3]) for client in senders}
        return result_after_modelled_link(uploads, aggregate, sorted(bad), upload_bytes, self.link, start, stop, release)

    def _describe(self, client: int) -> str:
        return f"Client {client} (rank {self.placement[client]})"

    def _refuse_misfits(self, senders: list[int], status: Tensor, misfits: dict[int, Optional[str]]) -> None:
        """Every rank raises for a delta that does not fit the block (the aggregator's own check, which a sum in
        parts never gets to run): the same error everywhere, before any rank waits in the next collective."""
        misfit = next((c for c in senders if status[c, 4] > 0), None)
        if misfit is not None:
            detail = misfits.get(misfit) or "does not fit the round's block (names or shapes)"
            raise ValueError(f"{self._describe(misfit)} sent a delta that {detail}.")

    def _sum(
        self,
        mine: dict[int, dict[str, Tensor]],
        senders: list[int],
        raw_weights: dict[int, float],
        layout: BlockLayout,
        round_index: int,
    ) -> tuple[Optional[dict[str, Tensor]], dict[int, Optional[str]], Callable[[], None]]:
        """Each rank adds its senders into one flat partial sum, checking every delta in the same pass, and the ranks
        all-reduce the sum with one flag per client behind it (set where a delta held NaN or Inf): in shared memory
        between ranks of one machine (:mod:`.shared_memory`), else by gloo. With a flag anywhere the policy raises,
        or every rank sums its kept clients again: the rare path, one more all-reduce. The sum is made in memory
        used again round after round; the release of it comes along."""
        sizes = [shape.numel() for _, shape in layout] + [len(self.placement)]  # the block, then one flag per client
        bad: dict[int, Optional[str]] = {}
        kept = senders
        while kept:
            try:
                total, flags, found, release = self._sum_kept(mine, kept, raw_weights, layout, sizes, round_index)
            except BaseException:
                if self.shared is not None:  # no file of this round's left in /dev/shm
                    self.shared.discard_round()
                raise
            flagged = {client: found.get(client) for client in kept if flags[client] > 0}
            if not flagged:
                return total, bad, release
            release()
            bad.update(flagged)
            kept = kept_clients(senders, bad, self.aggregator.nonfinite, self._describe)
        return None, bad, lambda: None

    def _sum_kept(
        self,
        mine: dict[int, dict[str, Tensor]],
        kept: list[int],
        raw_weights: dict[int, float],
        layout: BlockLayout,
        sizes: list[int],
        round_index: int,
    ) -> tuple[dict[str, Tensor], Tensor, dict[int, str], Callable[[], None]]:
        """The sum of every rank's ``kept`` clients and the flags behind it, the clients of this rank found
        non-finite, and what releases the sum."""

        def agree(values: Tensor) -> None:
            self._wait(dist.all_reduce(values, group=self.group, async_op=True), round_index)

        shared_partial = self.shared.partial(sizes, agree) if self.shared is not None else None
        if shared_partial is not None:
            partial, release = shared_partial, lambda: None
        else:
            partial, release = self.sums.take(sum(sizes), pin_memory=self.pin_memory)
        total, flags = views_by_layout(partial, layout), partial[sum(sizes[:-1]) :]
        flags.zero_()
        mine_kept = {client: mine[client] for client in sorted(set(mine) & set(kept))}
        found = self.aggregator.sum_into(total, mine_kept, normalized_weights(raw_weights, kept))
        for client in found:
            flags[client] = 1.0
        if self.shared is not None:
            summed = self.shared.all_reduce(agree)
            if summed is not None:
                total, flags, release = self._settled(layout, *summed)
                return total, flags, found, release
            self._give_up_shared_memory(self.shared)
        self._wait(dist.all_reduce(partial, group=self.group, async_op=True), round_index)
        return total, flags, found, release

    def _give_up_shared_memory(self, shared: SharedMemorySum) -> None:
        """A rank could not get shared memory: every rank adds up the sums by gloo from now on, and says why."""
        why = f"this rank's: {shared.failed}" if shared.failed is not None else "another rank could not get its memory"
        warnings.warn(
            f"Rank {self.rank} adds up the exchange's sums by gloo from now on: shared memory in {shared.directory}"
            f" failed ({why}). A larger /dev/shm (Docker: --shm-size) keeps them in shared memory;"
            " ByProcesses(shared_memory=False) says gloo from the start.",
            RuntimeWarning,
            stacklevel=1,
        )
        self.shared = None

    def _settled(
        self, layout: BlockLayout, tensors: list[Tensor], release: Callable[[], None]
    ) -> tuple[dict[str, Tensor], Tensor, Callable[[], None]]:
        """The shared sum's tensors, by name, and its flags, where the round boundary reads them: in place, or (a
        GPU model) copied to pinned memory, so that their upload does not block the host, and the shared memory is
        free at once."""
        if self.pin_memory:
            sizes = [tensor.numel() for tensor in tensors]
            pinned, keep = self.sums.take(sum(sizes), pin_memory=True)
            torch.cat(tensors, out=pinned)
            release()
            tensors, release = list(torch.split(pinned, sizes)), keep
        total = {name: tensor.view(shape) for (name, shape), tensor in zip(layout, tensors)}
        return total, tensors[-1], release

    def _gather(
        self,
        mine: dict[int, dict[str, Tensor]],
        kept: list[int],
        weights: dict[int, float],
        raw_weights: dict[int, float],
        layout: BlockLayout,
        round_index: int,
    ) -> dict[str, Tensor]:
        numel = sum(shape.numel() for _, shape in layout)
        # Every kept delta, gathered and padded to the largest share. On the host: world × rows × block fp32 on
        # every rank (never on a GPU).
        kept_on = [[c for c in kept if self.placement[c] == rank] for rank in range(self.world_size)]
        rows = max(len(clients) for clients in kept_on)
        local = torch.zeros(rows, numel, dtype=torch.float32, device=_HOST)
        for row, client in enumerate(kept_on[self.rank]):
            for name, view in views_by_layout(local[row], layout).items():
                view.copy_(mine[client][name])
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        self._wait(dist.all_gather(gathered, local, group=self.group, async_op=True), round_index)
        every = {
            client: views_by_layout(gathered[rank][row], layout)
            for rank, clients in enumerate(kept_on)
            for row, client in enumerate(clients)
        }
        if type(self.aggregator).__call__ is not Aggregator.__call__:  # a rule that does its own checking
            return self.aggregator(every, normalized_weights(raw_weights, list(every))).aggregate
        self.aggregator.check(every)
        return self.aggregator.combine(every, weights)

    def _wait(self, work: dist.Work, round_index: int) -> None:
        try:
            done = work.wait(self.timeout)
        except RuntimeError as error:
            if "time" not in str(error).lower():
                raise
            done = False
        if done is False:
            raise TimeoutError(
                f"a collective did not finish within comm_timeout={self.timeout.total_seconds()}s."
                f" {self.describe_stall(round_index)}"
            )

    def describe_stall(self, round_index: int) -> str:
        """Which ranks never joined the exchange of ``round_index`` (read from the job's store)."""
        try:
            missing = [
                rank
                for rank in range(self.world_size)
                if not self._store.check([f"parablock/joined/{round_index}/{rank}"])
            ]
        except Exception as error:  # noqa: BLE001 - the store's host may be the rank that died
            return f"The job's store is unreachable ({type(error).__name__}): rank 0 may have died."
        if missing:
            return f"Rank(s) {missing} never joined it."
        return "Every rank joined it; a peer stalled or died inside the collective."


def new_exchange_group(timeout_s: float) -> dist.ProcessGroup:
    """A gloo group for exchanges only, whatever the default group's backend; every rank must call it.

    Its timeout is ``timeout_s`` + :data:`GROUP_TIMEOUT_MARGIN_S`: the transport waits ``timeout_s`` and names the
    stalled rank before the group's own timeout could end the collective with a bare error.
    """
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s + GROUP_TIMEOUT_MARGIN_S))


def gather_from_ranks(value: Any, world_size: int) -> list[Any]:
    """Every rank's ``value`` (a small picklable object), on every rank, over the default group."""
    values: list[Any] = [None] * world_size
    dist.all_gather_object(values, value)
    return values
