"""Peak memory of N virtual clients on one model, beside what the design says it should be.

ParaBlock keeps one global model plus, per client, at most ``staleness + 1`` pending block deltas,
and the optimizer state of the one block being trained, so the expected peak is

    model + N·(s+1)·block + one block's optimizer state

Each N runs in a fresh process (peak RSS only grows). On CPU the figure is the growth of peak RSS
(``resource.getrusage``) from just before the model is built to the end of training; on CUDA it is
``torch.cuda.max_memory_allocated``. On CPU every allocation of 1 MiB or more gets its own mapping
(``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the RSS and its peak follows live tensors; with
``--glibc-heap`` glibc keeps freed blocks in its heap and the peak includes them. The second ratio
adds what a client's turn holds on top: the exact global copy of the blocks its view touches (s+1),
the block's gradient and the aggregate in flight. A Llama built from a config (random weights, no
download) with one decoder layer per block, fp32, AdamW, staleness 1, two rounds of one local step
per client.

    python benchmarks/memory.py [--clients 1 10 50] [--device cpu|cuda] [--hidden 512] [--layers 8] [--glibc-heap]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch.utils.data import Dataset

SEQUENCE = 32


class RandomTokens(Dataset):
    def __init__(self, size: int, vocab: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(3, vocab, (size, SEQUENCE), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(clients: int, device: str, hidden: int, layers: int) -> dict:
    """Train once in this process and return the measured peak and the pieces of the formula."""
    from common import TIMING_ONLY
    from lightning import Trainer
    from torch.utils.data import DataLoader

    from lightning_parablock import CausalLMModule, FederatedBlockStrategy, ParaBlockCallback

    config = dict(
        model_type="llama", vocab_size=256, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    loader = DataLoader(RandomTokens(2 * clients, config["vocab_size"]), batch_size=2)
    torch.set_num_threads(1)
    # What any run loads whatever its size (modules imported lazily, a first Trainer) comes before the baseline.
    CausalLMModule(config={**config, "hidden_size": 16, "intermediate_size": 16, "num_attention_heads": 2,
                           "num_key_value_heads": 2, "num_hidden_layers": 1})  # fmt: skip
    Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = _peak_rss_bytes()
    module = CausalLMModule(config=config, learning_rate=1e-4)
    strategy = FederatedBlockStrategy(num_clients=clients, local_steps=1, layers_per_block=1, seed=0)
    trainer = Trainer(
        strategy=strategy, callbacks=[ParaBlockCallback(staleness=1)], max_epochs=2,
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, **TIMING_ONLY,
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - started
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss_bytes() - before
    element = 4
    block = max(strategy.partition.numel(module, b) for b in range(len(strategy.partition))) * element
    model = sum(p.numel() for p in module.parameters()) * element
    return dict(clients=clients, peak=peak, model=model, block=block, optimizer=2 * block, seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument(
        "--glibc-heap", action="store_true",
        help="leave glibc's default: freed blocks stay in its heap and count in the peak RSS",
    )  # fmt: skip
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child run: print JSON
    options = parser.parse_args()
    if options.one is not None:
        print(json.dumps(measure(options.one, options.device, options.hidden, options.layers)), flush=True)
        return

    staleness = 1
    print(f"{'clients':>7s} {'measured':>11s} {'formula':>11s} {'ratio':>6s} {'+ turn':>11s} {'ratio':>6s}"
          "   (model, block in MB; seconds)")  # fmt: skip
    for clients in options.clients:
        command = [sys.executable, __file__, "--one", str(clients), "--device", options.device,
                   "--hidden", str(options.hidden), "--layers", str(options.layers)]  # fmt: skip
        env = dict(os.environ)
        if not options.glibc_heap:
            env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        if not run.stdout.strip():
            raise RuntimeError(f"the run with {clients} clients failed:\n{run.stderr[-2000:]}")
        result = json.loads(run.stdout.strip().splitlines()[-1])  # (printed and flushed before the process exits)
        formula = result["model"] + clients * (staleness + 1) * result["block"] + result["optimizer"]
        with_turn = formula + (staleness + 3) * result["block"]
        print(
            f"{clients:7d} {result['peak'] / 1e6:8.1f} MB {formula / 1e6:8.1f} MB {result['peak'] / formula:6.2f}"
            f" {with_turn / 1e6:8.1f} MB {result['peak'] / with_turn:6.2f}"
            f"   ({result['model'] / 1e6:.1f}, {result['block'] / 1e6:.1f}; {result['seconds']:.1f} s)"
        )
    print(f"\nformula: model + N·(s+1)·block + one block's AdamW state, s={staleness}, fp32; + turn: the formula plus"
          f" a turn's working set, (s+3)·block (the exact global copy of the blocks a view touches, the gradient,"
          f" the aggregate in flight); torch {torch.__version__}, {options.device}")  # fmt: skip


if __name__ == "__main__":
    main()
