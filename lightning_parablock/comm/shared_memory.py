"""Ranks on one machine add up their partial sums in shared memory instead of through gloo's TCP all-reduce.

Between ranks of one machine gloo's all-reduce still copies every byte into and out of the kernel's socket
buffers: at a Llama 3-8B block (1.75 GB of fp32) about one CPU second per rank and round, four fifths of a
one-client round (``benchmarks/exchange_throughput.py``). Ranks that share ``/dev/shm`` (and a network namespace:
ranks in namespaces of their own stand for machines of their own) instead each write their partial sum into a
file there that every rank maps. The block's tensors are shared out between the ranks, whole, in about equal
parts; each rank adds every other rank's partial of its own tensors into its own partial, in place, and every
rank then reads each tensor of the sum where its owner made it: no copy, and per rank and round its partial
written once and 1/W of every partial read once.

Small all-reduces on the transport's gloo group order the steps, so a stalled rank is still named within
``comm_timeout``; the first of them also carries whether every rank got its memory (a full ``/dev/shm``): if one did
not, every rank falls back to gloo's all-reduce for the rest of the run. The partials are used again round after
round, as one set per aggregate the round boundaries still hold (one, or ``staleness`` of them; at worst
:data:`MAX_SETS`). A file's name lives only from the round that makes it until every rank has mapped it, a few
collectives later; an exchange that fails in between, or a process that exits, unlinks it too (only a rank killed
in that window leaves one behind, named ``lightning_parablock-*``).

With a model on a GPU the sum is then copied to pinned memory (so the boundary's upload does not block the host),
which is one copy where gloo's all-reduce into pinned memory made one too.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import os
import secrets
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_parablock.comm.sum_buffers import first_call_only

SHARED_DIRECTORY = Path("/dev/shm")
FILE_PREFIX = "lightning_parablock-"
MAX_SETS = 8
"""Sets of partials kept for reuse (each one block of fp32 per rank in ``/dev/shm``). The boundaries hold at most
``staleness`` aggregates at once; a set never handed back is forgotten here once this many are held (its memory
goes with its last reference)."""

Agree = Callable[[Tensor], None]
"""Sums a small float64 tensor over the transport's group, in place, waiting at most ``comm_timeout``."""


def owned_ranges(sizes: Sequence[int], world_size: int) -> list[tuple[int, int]]:
    """Each rank's range of a flat vector made of tensors of ``sizes``: contiguous, cut at tensor boundaries only
    (a tensor of the sum is then one view), each cut at the boundary nearest an even share."""
    edges = list(itertools.accumulate(sizes, initial=0))
    cuts = [0]
    for rank in range(1, world_size):
        share = edges[-1] * rank / world_size
        cuts.append(min((edge for edge in edges if edge >= cuts[-1]), key=lambda edge: abs(edge - share)))
    cuts.append(edges[-1])
    return list(zip(cuts, cuts[1:]))


def _make(path: Path, numel: int) -> Tensor:
    """A new file of ``numel`` fp32 values, its pages reserved now (a full ``/dev/shm`` raises ``OSError`` here,
    not SIGBUS on a later write), mapped."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(descriptor, numel * 4)
        os.posix_fallocate(descriptor, 0, numel * 4)
    finally:
        os.close(descriptor)
    return _mapped(path, numel)


def _mapped(path: Path, numel: int) -> Tensor:
    """The file a rank made, mapped: writes through it are every rank's. Refused unless it is there, whole (torch
    would make a missing file, or grow a short one, with no pages reserved)."""
    size = path.stat().st_size
    if size < numel * 4:
        raise OSError(errno.EINVAL, f"{path} holds {size} bytes, not the {numel * 4} expected")
    return torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)


def _ranks_where(true_here: bool, agree: Agree) -> int:
    """On how many ranks something is true (agreed: every rank gets the same count)."""
    votes = torch.tensor([float(true_here)], dtype=torch.float64)
    agree(votes)
    return int(votes.item())


def _unlink_all(paths: list[Path]) -> None:
    """Unlink ``paths`` (each may be gone already) and forget them."""
    for path in paths:
        path.unlink(missing_ok=True)
    paths.clear()


@dataclass
class _PartialSet:
    """Every rank's partial of one round (this rank's made here, the others mapped), their size, and whether this
    rank still reads the sum in them."""

    partials: list[Optional[Tensor]]
    numel: int
    held: bool = True


class SharedMemorySum:
    """The all-reduce of one partial sum per rank, in memory every rank of this machine maps.

    Built by :meth:`between` on every rank; used by
    :class:`~lightning_parablock.comm.distributed.CollectiveTransport` on the communication thread, one exchange at a
    time: :meth:`partial` (the memory to sum this rank's clients into), then :meth:`all_reduce`.
    """

    def __init__(self, token: str, rank: int, world_size: int, directory: Path = SHARED_DIRECTORY) -> None:
        self.token, self.rank, self.world_size, self.directory = token, rank, world_size, directory
        self._sets: list[_PartialSet] = []  # the same list on every rank: each choice is made from agreed figures
        self._made = 0  # sets made so far, to name the next one's files
        self._named: list[Path] = []  # this rank's file of a set made this round, until every rank has mapped it
        self._unmapped: dict[int, Path] = {}  # the other ranks' files of that set, by rank
        weakref.finalize(self, _unlink_all, self._named)  # at exit too: no name left in /dev/shm
        self._failed: Optional[Exception] = None
        self._current: Optional[_PartialSet] = None
        self._sizes: list[int] = []
        self._lock = threading.Lock()  # sums are handed back on the main thread

    @classmethod
    def between(cls, group: dist.ProcessGroup, directory: Path = SHARED_DIRECTORY) -> Optional[SharedMemorySum]:
        """A shared-memory sum for ``group`` when all its ranks share ``directory`` and a network namespace, else
        ``None``; every rank of the group must call it (it runs collectives on ``group``)."""
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        if world_size < 2:
            return None
        token = [f"{secrets.token_hex(8)}-{os.getpid()}" if rank == 0 else None]
        dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0), group=group)
        probe = directory / f"{FILE_PREFIX}{token[0]}-probe"
        network = _network_namespace()
        try:
            if rank == 0:
                try:
                    probe.write_text(network)
                except OSError:
                    pass
            dist.barrier(group=group)
            try:
                seen = probe.read_text() == network
            except OSError:
                seen = False
            # every rank has read the probe after this
            seen_everywhere = _ranks_where(seen, lambda votes: dist.all_reduce(votes, group=group)) == world_size
        finally:
            if rank == 0:
                probe.unlink(missing_ok=True)
        if not seen_everywhere:
            return None
        return cls(token[0], rank, world_size, directory)

    @property
    def failed(self) -> Optional[Exception]:
        """Why this rank could not get shared memory, once it could not."""
        return self._failed

    def partial(self, sizes: Sequence[int], agree: Agree) -> Optional[Tensor]:
        """This rank's partial sum of tensors of ``sizes`` (one flat vector, holding what an earlier round left), or
        ``None`` when this rank could not get the memory: then it sums into memory of its own and
        :meth:`all_reduce` tells every rank to use gloo. Agrees with the other ranks which set of partials to use."""
        free = torch.tensor([1.0] + [float(not s.held) for s in self._sets], dtype=torch.float64)  # never empty
        agree(free)
        usable = [i for i, count in enumerate(free[1:].tolist()) if count == self.world_size]
        numel = sum(sizes)
        self._sizes = list(sizes)
        try:
            self._current = self._set_for(numel, usable)
        except (OSError, RuntimeError) as error:  # a full /dev/shm, or a mapping refused
            self._failed, self._current = error, None
            return None
        mine = self._current.partials[self.rank]
        assert mine is not None
        return mine[:numel]

    def all_reduce(self, agree: Agree) -> Optional[tuple[list[Tensor], Callable[[], None]]]:
        """Each tensor of the sum of every rank's partial (flat, in the order of the sizes given to
        :meth:`partial`, the same on every rank), and what to call once this rank reads them no more; or ``None``
        when a rank could not get shared memory (every rank then gloo-reduces its partial, and this object is used
        no more)."""
        current = self._current
        failed = _ranks_where(current is None, agree)  # every partial written and every new file made
        if not failed and self._unmapped:
            assert current is not None
            failed = self._map_others(current, agree)
        _unlink_all(self._named)  # every rank has mapped every file made this round, or given up on them
        if failed:
            return None
        assert current is not None
        partials: list[Tensor] = current.partials  # type: ignore[assignment]  # every one mapped by now
        ranges = owned_ranges(self._sizes, self.world_size)
        start, end = ranges[self.rank]
        mine = partials[self.rank][start:end]
        for rank, partial in enumerate(partials):
            if rank != self.rank:
                mine.add_(partial[start:end])
        agree(torch.zeros(1, dtype=torch.float64))  # every tensor added up
        starts = [start for start, _ in ranges]
        edges = list(itertools.accumulate(self._sizes, initial=0))
        tensors = [partials[bisect.bisect_right(starts, lo) - 1][lo:hi] for lo, hi in zip(edges, edges[1:])]

        def hand_back() -> None:  # on the main thread, once the round boundary has applied the sum
            current.held = False

        return tensors, first_call_only(hand_back, self._lock)

    def _set_for(self, numel: int, usable: list[int]) -> _PartialSet:
        """A set free on every rank and large enough, a larger one in place of a free one too small, or a new one;
        the same choice on every rank (``usable`` is agreed). This rank makes its own file of a new set now and
        maps the others' once every rank has made its own."""
        fits = [i for i in usable if self._sets[i].numel >= numel]
        if fits:
            chosen = self._sets[fits[0]]
            with self._lock:
                chosen.held = True
            return chosen
        names = [self.directory / f"{FILE_PREFIX}{self.token}-{self._made}-rank{r}" for r in range(self.world_size)]
        self._made += 1
        self._unmapped = {rank: name for rank, name in enumerate(names) if rank != self.rank}
        self._named.append(names[self.rank])
        new = _PartialSet([None] * self.world_size, numel)
        if usable:
            self._sets[usable[0]] = new
        else:
            if len(self._sets) >= MAX_SETS:
                self._sets.pop(0)
            self._sets.append(new)
        new.partials[self.rank] = _make(names[self.rank], numel)
        return new

    def _map_others(self, current: _PartialSet, agree: Agree) -> int:
        """Map the other ranks' files of a set made this round; on how many ranks that failed (agreed)."""
        try:
            for rank, path in self._unmapped.items():
                current.partials[rank] = _mapped(path, current.numel)
        except (OSError, RuntimeError) as error:
            self._failed = error
        self._unmapped = {}
        return _ranks_where(self._failed is not None, agree)

    def discard_round(self) -> None:
        """The exchange failed between :meth:`partial` and the end of :meth:`all_reduce`: unlink the file this rank
        made in it, if any (the other ranks do the same with theirs)."""
        _unlink_all(self._named)
        self._unmapped = {}


def _network_namespace() -> str:
    """This process's network namespace, as the kernel names it (the same text for the same namespace)."""
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return "unknown"
