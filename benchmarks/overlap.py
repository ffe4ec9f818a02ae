"""Measure what overlapping communication with compute saves, and what N virtual clients cost in memory.

Runs the tiny Llama of recipes/tiny.yaml on the synthetic arithmetic task twice in this process, with the
same seeds: FedBCD (staleness 0: train, then exchange) and ParaBlock (staleness 1: exchange round t-1 while
round t trains), over a SimulatedLink whose latency makes an exchange cost about as much as a round's compute.
Prints this process's measured seconds for both and their ratio, then the bytes the federation holds beyond
the global model for a growing number of clients.

    python benchmarks/overlap.py [--rounds 6] [--clients 4] [--latency 0.12s] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import torch
from common import TIMING_ONLY, TINY_CONFIG
from lightning import Callback, Trainer

from lightning_parablock import CausalLMModule, FederatedBlockStrategy, ParaBlockCallback, SimulatedLink
from lightning_parablock.core.sizes import nbytes_of
from lightning_parablock.data import SyntheticArithmeticDataModule


class LargestClientState(Callback):
    def __init__(self) -> None:
        self.bytes = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        strategy = trainer.strategy
        held = strategy.federation.client_state_nbytes() + strategy.client_exchange.residual_nbytes()
        self.bytes = max(self.bytes, held)


def run(staleness: int, clients: int, rounds: int, latency: str, device: str, probe: Optional[Callback] = None):
    module = CausalLMModule(config=TINY_CONFIG, learning_rate=3e-3, seed=0)
    data = SyntheticArithmeticDataModule(
        num_examples=40 * clients, val_examples=0, batch_size=16, partition="iid", seed=0
    )
    callback = ParaBlockCallback(staleness=staleness, link=SimulatedLink("100MB/s", latency))
    trainer = Trainer(
        strategy=FederatedBlockStrategy(num_clients=clients, local_steps=4, seed=0),
        callbacks=[callback, *([probe] if probe else [])],
        max_epochs=rounds,
        accelerator=device,
        **TIMING_ONLY,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return time.perf_counter() - started, callback.summary(), module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--latency", default="0.12s", help="one-way link latency; 2x this per exchange")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'gpu'")
    options = parser.parse_args()

    results = {}
    for staleness, name in ((0, "FedBCD"), (1, "ParaBlock")):
        seconds, summary, _ = run(staleness, options.clients, options.rounds, options.latency, options.device)
        results[name] = seconds
        print(
            f"{name:9s} (staleness {staleness}): {seconds:6.2f} s measured fit, {summary.compute_seconds:6.2f} s"
            f" compute, {summary.exposed_wait_seconds:6.2f} s exposed comm wait"
        )
    print(f"ParaBlock / FedBCD measured time: {results['ParaBlock'] / results['FedBCD']:.3f}")

    print("\nclient state beyond the global model (staleness 1, optimizer state reset per block):")
    for clients in (2, 8, 32):
        probe = LargestClientState()
        _, _, module = run(1, clients, 2, "0s", options.device, probe)
        strategy = module.trainer.strategy
        block_bytes = max(strategy.partition.numel(module, b) for b in range(len(strategy.partition))) * 4
        model_bytes = nbytes_of(module.parameters())
        print(
            f"  {clients:3d} clients: {probe.bytes / 1e6:6.2f} MB in all, {probe.bytes / clients / block_bytes:4.2f}"
            f" fp32 blocks per client (model: {model_bytes / 1e6:.2f} MB, largest block {block_bytes / 1e6:.2f} MB)"
        )
    print(f"\ntorch {torch.__version__}, device {options.device}")


if __name__ == "__main__":
    main()
