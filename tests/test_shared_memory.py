"""Ranks of one machine add up their partial sums in shared memory: the same sums, each tensor read where its owner
made it, memory used again only once every rank has handed it back, gloo when a rank gets no memory, no file left.

Two ranks here are two threads of this process, agreeing through a barrier instead of gloo; the real two-process
runs are in ``test_contract_ranks.py`` (every rule, bit for bit against gloo) and the distributed fits."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_parablock.comm import shared_memory
from lightning_parablock.comm.by_processes import ByProcesses
from lightning_parablock.comm.shared_memory import SharedMemorySum, owned_ranges

SIZES = [5, 3, 8, 2, 6]


class ThreadRanks:
    """``world_size`` ranks as threads: each runs ``work(rank, sum_, agree)``; ``agree`` sums over the ranks."""

    def __init__(self, directory: Path, world_size: int = 2) -> None:
        self.world_size = world_size
        self.sums = [SharedMemorySum("test", rank, world_size, directory) for rank in range(world_size)]
        self._barrier = threading.Barrier(world_size, timeout=20)
        self._values: list[Any] = [None] * world_size

    def agree(self, rank: int) -> Callable[[torch.Tensor], None]:
        def agree(values: torch.Tensor) -> None:
            self._values[rank] = values.clone()
            self._barrier.wait()
            total = sum(self._values)
            self._barrier.wait()
            values.copy_(total)

        return agree

    def run(self, work: Callable[[int, SharedMemorySum, Callable], Any]) -> list[Any]:
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException] = []

        def one(rank: int) -> None:
            try:
                results[rank] = work(rank, self.sums[rank], self.agree(rank))
            except BaseException as error:  # noqa: BLE001 - re-raised on the test's thread
                errors.append(error)
                self._barrier.abort()

        threads = [threading.Thread(target=one, args=(rank,), name=f"rank{rank}") for rank in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a rank hung"
        if errors:
            raise errors[0]
        return results


def partial_of(rank: int, sizes: list[int], seed: int = 0) -> torch.Tensor:
    return torch.randn(sum(sizes), generator=torch.Generator().manual_seed(100 * seed + rank))


def exchange(sizes: list[int], seed: int = 0, release: bool = True):
    """One round: each rank writes its partial and all-reduces; its tensors (copied), their addresses, the release,
    and the tensors themselves while not released."""

    def work(rank: int, shared: SharedMemorySum, agree: Callable) -> Any:
        partial = shared.partial(sizes, agree)
        if partial is not None:  # None: this rank got no shared memory (it would sum into its own)
            partial.copy_(partial_of(rank, sizes, seed))
        summed = shared.all_reduce(agree)
        if summed is None:
            return None
        tensors, handed_back = summed
        copies = [tensor.clone() for tensor in tensors]
        addresses = [tensor.data_ptr() for tensor in tensors]
        if release:
            handed_back()
            tensors = []
        return copies, addresses, handed_back, tensors

    return work


def expected_tensors(sizes: list[int], world_size: int, seed: int = 0) -> list[torch.Tensor]:
    total = sum(partial_of(rank, sizes, seed) for rank in range(world_size))
    return list(torch.split(total, sizes))


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_gets_the_sum_of_every_partial_and_no_file_is_left(tmp_path, world_size):
    ranks = ThreadRanks(tmp_path, world_size)
    for seed in range(3):
        results = ranks.run(exchange(SIZES, seed))
        for copies, *_ in results:
            for got, expected in zip(copies, expected_tensors(SIZES, world_size, seed)):
                torch.testing.assert_close(got, expected)
    assert list(tmp_path.iterdir()) == []


def test_two_ranks_give_gloos_bits(tmp_path):  # the owner adds the other's partial to its own: a + b == b + a
    ranks = ThreadRanks(tmp_path)
    copies = ranks.run(exchange(SIZES))[0][0]
    assert torch.equal(torch.cat(copies), partial_of(0, SIZES) + partial_of(1, SIZES))


def test_a_set_still_held_is_never_written_and_a_released_one_is_used_again(tmp_path):
    ranks = ThreadRanks(tmp_path)
    first = ranks.run(exchange(SIZES, seed=1, release=False))
    second = ranks.run(exchange(SIZES, seed=2, release=False))  # the first is held: another set
    assert first[0][1][0] != second[0][1][0]
    for copies, *_ in first:  # still the first round's sum
        torch.testing.assert_close(torch.cat(copies), torch.cat(expected_tensors(SIZES, 2, seed=1)))
    for _, _, release, _ in first + second:
        release()
    third = ranks.run(exchange(SIZES, seed=3, release=False))
    assert third[0][1][0] == first[0][1][0]  # handed back everywhere: used again
    for _, _, release, _ in first:
        release()  # a second call must not free the set the third round holds now
    fourth = ranks.run(exchange(SIZES, seed=4))
    assert fourth[0][1][0] == second[0][1][0]
    for copies, *_ in third:
        torch.testing.assert_close(torch.cat(copies), torch.cat(expected_tensors(SIZES, 2, seed=3)))
    assert list(tmp_path.iterdir()) == []


def test_a_set_one_rank_still_holds_is_not_written_though_the_other_handed_it_back(tmp_path):
    ranks = ThreadRanks(tmp_path)
    first = ranks.run(exchange(SIZES, seed=1, release=False))
    first[0][2]()  # rank 0 has applied its aggregate; rank 1 has not yet
    second = ranks.run(exchange(SIZES, seed=2))
    assert second[0][1][0] != first[0][1][0]
    still_read = torch.cat(first[1][3])  # rank 1's aggregate, where it reads it, after the second round
    torch.testing.assert_close(still_read, torch.cat(expected_tensors(SIZES, 2, seed=1)))


def test_held_sets_beyond_the_most_kept_are_forgotten_not_written(tmp_path, monkeypatch):
    monkeypatch.setattr(shared_memory, "MAX_SETS", 2)
    ranks = ThreadRanks(tmp_path)
    held = [ranks.run(exchange(SIZES, seed=seed, release=False)) for seed in range(4)]  # none handed back
    assert all(len(shared._sets) == 2 for shared in ranks.sums)
    for seed, results in enumerate(held):  # every sum still as it was made: a forgotten set is never written
        for copies, *_ in results:
            torch.testing.assert_close(torch.cat(copies), torch.cat(expected_tensors(SIZES, 2, seed=seed)))
    assert len({results[0][1][0] for results in held}) == 4
    assert list(tmp_path.iterdir()) == []


def test_empty_tensors_and_more_ranks_than_tensors(tmp_path):
    sizes = [0, 5, 0]
    results = ThreadRanks(tmp_path, world_size=4).run(exchange(sizes))
    for copies, *_ in results:
        assert [c.numel() for c in copies] == sizes
        torch.testing.assert_close(torch.cat(copies), torch.cat(expected_tensors(sizes, 4)))


def test_a_rank_that_cannot_map_anothers_file_sends_every_rank_to_gloo(tmp_path, monkeypatch):
    real_mapped = shared_memory._mapped

    def refused_on_rank_0(path: Path, numel: int) -> torch.Tensor:
        if path.name.endswith("rank1") and threading.current_thread().name == "rank0":
            raise RuntimeError("mmap refused")
        return real_mapped(path, numel)

    monkeypatch.setattr(shared_memory, "_mapped", refused_on_rank_0)
    ranks = ThreadRanks(tmp_path)
    assert ranks.run(exchange(SIZES)) == [None, None]
    assert isinstance(ranks.sums[0].failed, RuntimeError) and ranks.sums[1].failed is None
    assert list(tmp_path.iterdir()) == []


def test_an_exchange_that_fails_midway_leaves_no_file(tmp_path):
    def work(rank: int, shared: SharedMemorySum, agree: Callable) -> None:
        try:
            shared.partial(SIZES, agree)
            if rank == 1:
                raise RuntimeError("a delta that does not fit")
            shared.all_reduce(agree)  # the other rank never comes: the wait ends in an error
        except BaseException:
            shared.discard_round()  # what CollectiveTransport does on any error
            raise

    with pytest.raises((RuntimeError, threading.BrokenBarrierError)):
        ThreadRanks(tmp_path).run(work)
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_there_or_short_is_not_mapped(tmp_path):
    with pytest.raises(FileNotFoundError):
        shared_memory._mapped(tmp_path / "absent", 4)
    (tmp_path / "short").write_bytes(b"\0" * 8)
    with pytest.raises(OSError, match="holds 8 bytes, not the 16 expected"):
        shared_memory._mapped(tmp_path / "short", 4)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["short"]


def test_a_larger_block_gets_a_larger_set_and_a_smaller_one_fits_in_it(tmp_path):
    ranks = ThreadRanks(tmp_path)
    small = ranks.run(exchange(SIZES))
    large_sizes = SIZES + [40]
    large = ranks.run(exchange(large_sizes, seed=1))
    for copies, *_ in large:
        torch.testing.assert_close(torch.cat(copies), torch.cat(expected_tensors(large_sizes, 2, seed=1)))
    again = ranks.run(exchange(SIZES, seed=2))
    assert again[0][1][0] == large[0][1][0] != small[0][1][0]


def test_a_rank_without_memory_sends_every_rank_to_gloo_and_nothing_is_left(tmp_path, monkeypatch):
    real_make = shared_memory._make

    def full_for_rank_1(path: Path, numel: int) -> torch.Tensor:
        if path.name.endswith("rank1"):
            path.touch()  # made, then refused its pages: it must go too
            raise OSError(28, "No space left on device")
        return real_make(path, numel)

    monkeypatch.setattr(shared_memory, "_make", full_for_rank_1)
    ranks = ThreadRanks(tmp_path)
    results = ranks.run(exchange(SIZES))
    assert results == [None, None]
    assert isinstance(ranks.sums[1].failed, OSError) and ranks.sums[0].failed is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", range(20))
def test_owned_ranges_cover_the_vector_in_order_cut_only_between_tensors_and_about_evenly(seed):
    generator = random.Random(seed)
    sizes = [generator.choice([0, 1, 7, 64, 1000]) for _ in range(generator.randint(1, 12))]
    world_size = generator.randint(1, 5)
    ranges = owned_ranges(sizes, world_size)
    edges = {0}
    for size in sizes:
        edges.add(max(edges) + size)
    assert len(ranges) == world_size and ranges[0][0] == 0 and ranges[-1][1] == sum(sizes)
    assert all(a <= b for a, b in ranges) and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    assert all(a in edges and b in edges for a, b in ranges)
    for rank, (a, b) in enumerate(ranges[1:], start=1):  # no other boundary is nearer an even share
        share = sum(sizes) * rank / world_size
        assert all(abs(a - share) <= abs(edge - share) for edge in edges if edge >= ranges[rank - 1][0])


def test_a_llama_block_is_cut_between_its_two_layers():
    layer = [4096 * 4096, 1024 * 4096, 1024 * 4096, 4096 * 4096, 14336 * 4096, 14336 * 4096, 4096 * 14336, 4096, 4096]
    assert owned_ranges(layer + layer + [8], 2)[0][1] == sum(layer)


def test_by_processes_takes_a_boolean_and_says_so():
    assert repr(ByProcesses()) == "ByProcesses()"
    assert repr(ByProcesses(shared_memory=False)) == "ByProcesses(shared_memory=False)"
    with pytest.raises(TypeError, match=r"ByProcesses\(shared_memory=...\) takes True or False, got 'no'"):
        ByProcesses(shared_memory="no")  # type: ignore[arg-type]
