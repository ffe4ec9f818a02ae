"""Two gloo ranks exchange the same round's deltas through ``CollectiveTransport``; rank 0 saves the aggregates.

A second round has a NaN in the delta of client 3 (rank 1): under ``nonfinite="skip"`` every rule leaves it out on
both ranks; under ``"raise"`` each rank saves the error it raised. Last, one mean transport runs rounds whose
aggregates are released as the round boundary releases them: each later sum is made in the same memory.

    python aggregation_ranks.py OUT_FILE PORT
"""

from __future__ import annotations

import sys
import threading

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_parablock import MeanAggregator, MedianAggregator, TrimmedMeanAggregator
from lightning_parablock.aggregation.rules import SLICE_VALUES
from lightning_parablock.comm.distributed import CollectiveTransport
from lightning_parablock.comm.link import SimulatedLink
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


def round_deltas(with_nan: bool = False, seed: int = 11) -> dict[int, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    deltas = {c: {name: torch.randn(shape, generator=generator) for name, shape in LAYOUT} for c in WEIGHTS}
    if with_nan:
        deltas[BAD_CLIENT]["c"][-1] = float("nan")
    return deltas


def rank_main(rank: int, out: str, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    for round_index, (rules, with_nan) in enumerate(((RULES, False), (SKIPPING, True), (RULES, True))):
        mine = {c: d for c, d in round_deltas(with_nan).items() if PLACEMENT[c] == rank}
        for name, aggregator in rules.items():
            group = dist.new_group(backend="gloo")
            transport = CollectiveTransport(group, aggregator, SimulatedLink(), PLACEMENT, lambda b: LAYOUT, 60.0)
            uploads = RoundUploads(round_index, 0, mine, {c: WEIGHTS[c] for c in mine})
            try:
                result = transport.exchange(uploads, threading.Event())
                results[round_index, name] = (result.aggregate, result.skipped_clients)
            except Exception as error:  # noqa: BLE001 - the "raise" policy's error, compared by the test
                results[round_index, name] = f"{type(error).__name__}: {error}"
    group = dist.new_group(backend="gloo")
    transport = CollectiveTransport(group, RULES["mean"], SimulatedLink(), PLACEMENT, lambda b: LAYOUT, 60.0)
    for round_index in range(REUSED_ROUNDS):
        mine = {c: d for c, d in round_deltas(seed=20 + round_index).items() if PLACEMENT[c] == rank}
        result = transport.exchange(RoundUploads(round_index, 0, mine, {c: WEIGHTS[c] for c in mine}), threading.Event())
        results["reused", round_index] = ({n: t.clone() for n, t in result.aggregate.items()}, result.aggregate["a"].data_ptr())
        result.release_aggregate()
    torch.save(results, f"{out}.rank{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(rank_main, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
