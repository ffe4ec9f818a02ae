"""What compressing the upload costs in loss: the tiny task's validation loss for each codec and precision.

Trains the tiny Llama of recipes/tiny.yaml (random init, ~0.2M parameters) on the synthetic arithmetic task
with ParaBlock (staleness 1) once per setting, same seeds, and prints the final validation loss (token
cross-entropy of the global model after the flush) beside the bytes all clients uploaded.

    python benchmarks/compression.py [--rounds 24] [--clients 4] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import TIMING_ONLY, TINY_CONFIG
from lightning import Trainer

from lightning_parablock import CausalLMModule, FederatedBlockStrategy, ParaBlockCallback
from lightning_parablock.data import SyntheticArithmeticDataModule

SETTINGS = [  # (compression, precision)
    ("none", "32-true"),
    ("bf16", "32-true"),
    ("int8", "32-true"),
    ("int8-block", "32-true"),
    ("topk", "32-true"),
    ("none", "bf16-true"),
    ("none", "bf16-mixed"),
]


def run(compression: str, precision: str, clients: int, rounds: int, device: str) -> tuple[float, int, float]:
    """Final validation loss, bytes uploaded and seconds of one run."""
    module = CausalLMModule(config=TINY_CONFIG, learning_rate=3e-3, seed=0)
    data = SyntheticArithmeticDataModule(
        num_examples=100 * clients, val_examples=128, batch_size=16, partition="dirichlet", seed=0
    )
    callback = ParaBlockCallback(staleness=1, compression=compression)
    trainer = Trainer(
        strategy=FederatedBlockStrategy(num_clients=clients, local_steps=4, include_embeddings=True, seed=0),
        callbacks=[callback],
        max_epochs=rounds,
        accelerator=device,
        precision=precision,
        **TIMING_ONLY,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    validator = Trainer(accelerator=device, precision=precision, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    loss = validator.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    uploaded = sum(sum(record.upload_bytes.values()) for record in callback.records)
    return float(loss), uploaded, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="'cpu' or 'gpu'")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 2 clients: checks that it runs")
    options = parser.parse_args()
    if options.quick:
        options.rounds, options.clients = 2, 2
    torch.set_float32_matmul_precision("highest")
    print(f"{'compression':12s} {'precision':11s} {'val loss':>9s} {'uploaded':>12s} {'seconds':>8s}")
    for compression, precision in SETTINGS:
        loss, uploaded, seconds = run(compression, precision, options.clients, options.rounds, options.device)
        print(f"{compression:12s} {precision:11s} {loss:9.4f} {uploaded / 1e6:9.3f} MB {seconds:8.1f}")
    setup = f"{options.clients} clients, {options.rounds} rounds, 4 local steps"
    print(f"\n{setup}; torch {torch.__version__}, {options.device}")


if __name__ == "__main__":
    main()
