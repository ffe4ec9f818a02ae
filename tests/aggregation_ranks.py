"""Two gloo ranks exchange the same round's deltas through ``CollectiveTransport``; rank 0 saves the aggregates.

    python aggregation_ranks.py OUT_FILE PORT
"""

from __future__ import annotations

import sys
import threading

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_parablock import MeanAggregator, MedianAggregator, TrimmedMeanAggregator
from lightning_parablock.comm.distributed import CollectiveTransport
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.comm.transport import RoundUploads

PLACEMENT = [0, 1, 0, 1, 1]  # client -> rank
WEIGHTS = {0: 3.0, 1: 1.0, 2: 7.0, 3: 2.0, 4: 5.0}
LAYOUT = [("a", torch.Size([257])), ("b", torch.Size([4, 3]))]
RULES = {"mean": MeanAggregator(weighting="samples"), "median": MedianAggregator(), "trimmed_mean": TrimmedMeanAggregator(0.2)}


def round_deltas() -> dict[int, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(11)
    return {c: {name: torch.randn(shape, generator=generator) for name, shape in LAYOUT} for c in WEIGHTS}


def rank_main(rank: int, out: str, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mine = {c: d for c, d in round_deltas().items() if PLACEMENT[c] == rank}
    results = {}
    for name, aggregator in RULES.items():
        transport = CollectiveTransport(dist.new_group(backend="gloo"), aggregator, SimulatedLink(), PLACEMENT, lambda b: LAYOUT, 60.0)
        uploads = RoundUploads(0, 0, mine, {c: WEIGHTS[c] for c in mine})
        results[name] = transport.exchange(uploads, threading.Event()).aggregate
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(rank_main, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
