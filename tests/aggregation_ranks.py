"""Two gloo ranks exchange the same round's deltas through ``CollectiveTransport``; rank 0 saves the aggregates.

A second round has a NaN in the delta of client 3 (rank 1): under ``nonfinite="skip"`` every rule leaves it out on
both ranks; under ``"raise"`` each rank saves the error it raised. Every case runs twice: the partial sums added up
by gloo, and in shared memory (``SharedMemorySum``). Then one mean transport of each kind runs rounds whose
aggregates are released as the round boundary releases them: each later sum is made in the same memory; one
holds two aggregates at once (a staleness of 2); and one whose rank 1 finds ``/dev/shm`` full falls back to gloo
on both ranks.

    python aggregation_ranks.py OUT_FILE PORT
"""

from __future__ import annotations

import sys
import threading
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_parablock import MeanAggregator, MedianAggregator, TrimmedMeanAggregator
from lightning_parablock.aggregation.rules import SLICE_VALUES
from lightning_parablock.comm.distributed import CollectiveTransport
from lightning_parablock.comm import shared_memory
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.comm.shared_memory import SharedMemorySum
from lightning_parablock.comm.transport import RoundUploads

PLACEMENT = [0, 1, 0, 1, 1]  # client -> rank
WEIGHTS = {0: 3.0, 1: 1.0, 2: 7.0, 3: 2.0, 4: 5.0}
LAYOUT = [("a", torch.Size([257])), ("b", torch.Size([4, 3])), ("c", torch.Size([SLICE_VALUES + 3]))]
RULES = {"mean": MeanAggregator(weighting="samples"), "median": MedianAggregator(), "trimmed_mean": TrimmedMeanAggregator(0.2)}
SKIPPING = {
    "mean": MeanAggregator(weighting="samples", nonfinite="skip"),
    "median": MedianAggregator(nonfinite="skip"),
    "trimmed_mean": TrimmedMeanAggregator(0.2, nonfinite="skip"),
}
BAD_CLIENT = 3  # on rank 1; its NaN sits in the last slice of "c"


REUSED_ROUNDS = 3
SUMS = ("gloo", "shared")
TOKENS: list[str] = []  # of every shared-memory sum this rank made


def round_deltas(with_nan: bool = False, seed: int = 11) -> dict[int, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    deltas = {c: {name: torch.randn(shape, generator=generator) for name, shape in LAYOUT} for c in WEIGHTS}
    if with_nan:
        deltas[BAD_CLIENT]["c"][-1] = float("nan")
    return deltas


def transport_of(aggregator, sums: str) -> CollectiveTransport:
    group = dist.new_group(backend="gloo")
    shared = SharedMemorySum.between(group) if sums == "shared" else None
    assert (shared is not None) == (sums == "shared"), "two ranks of one machine share /dev/shm"
    if shared is not None:
        TOKENS.append(shared.token)
    return CollectiveTransport(group, aggregator, SimulatedLink(), PLACEMENT, lambda b: LAYOUT, 60.0, shared=shared)


def exchange(transport: CollectiveTransport, rank: int, round_index: int, deltas):
    mine = {c: d for c, d in deltas.items() if PLACEMENT[c] == rank}
    return transport.exchange(RoundUploads(round_index, 0, mine, {c: WEIGHTS[c] for c in mine}), threading.Event())


def copied(aggregate) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in aggregate.items()}


def rank_main(rank: int, out: str, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    for sums in SUMS:
        for round_index, (rules, with_nan) in enumerate(((RULES, False), (SKIPPING, True), (RULES, True))):
            for name, aggregator in rules.items():
                transport = transport_of(aggregator, sums)
                try:
                    result = exchange(transport, rank, round_index, round_deltas(with_nan))
                    results[sums, round_index, name] = (result.aggregate, result.skipped_clients)
                except Exception as error:  # noqa: BLE001 - the "raise" policy's error, compared by the test
                    results[sums, round_index, name] = f"{type(error).__name__}: {error}"
        transport = transport_of(RULES["mean"], sums)
        for round_index in range(REUSED_ROUNDS):
            result = exchange(transport, rank, round_index, round_deltas(seed=20 + round_index))
            results[sums, "reused", round_index] = (copied(result.aggregate), result.aggregate["a"].data_ptr())
            result.release_aggregate()
        results[sums, "reused", "shared memory kept"] = transport.shared is not None
    transport = transport_of(RULES["mean"], "shared")  # two aggregates held at once, then both handed back
    held = [exchange(transport, rank, r, round_deltas(seed=30 + r)) for r in range(2)]
    results["held"] = [(copied(h.aggregate), h.aggregate["a"].data_ptr()) for h in held]
    for h in held:
        h.release_aggregate()
    again = exchange(transport, rank, 2, round_deltas(seed=32))
    results["held", "again"] = (copied(again.aggregate), again.aggregate["a"].data_ptr())
    transport = transport_of(RULES["mean"], "shared")  # rank 1's /dev/shm is full from its first round
    if rank == 1:

        def full(path, numel):
            path.touch()  # made, then refused its pages
            raise OSError(28, "No space left on device")

        shared_memory._make = full  # this process ends with this case
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for round_index in range(2):
            result = exchange(transport, rank, round_index, round_deltas(seed=40 + round_index))
            results["full", round_index] = (copied(result.aggregate), transport.shared is None)
    results["full", "warned"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
    dist.barrier()
    results["left in /dev/shm"] = sorted(
        path.name for token in TOKENS for path in shared_memory.SHARED_DIRECTORY.glob(f"*{token}*")
    )
    results["tokens"] = len(TOKENS)
    torch.save(results, f"{out}.rank{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(rank_main, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
