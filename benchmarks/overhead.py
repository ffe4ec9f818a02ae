"""What a training step costs on top of a bare PyTorch loop: the strategy, plain Lightning, N clients.

Four runs of the same model, data and block, alternated in this process so that load on the machine
hits them alike, several repeats each, medians reported:

- bare: a plain PyTorch loop, forward, backward, AdamW step, a new AdamW every ``local_steps`` steps;
- strategy N=1: ``FederatedBlockStrategy`` with one client, ``steps / local_steps`` rounds of
  ``local_steps`` steps, staleness 1, no link (an exchange costs only its real copies);
- Lightning: a plain ``Trainer`` on the same module, everything but the block frozen, ``max_steps``
  equal to the bare loop's steps;
- strategy N=10: ten clients, whose turns switch every ``local_steps`` steps, for two rounds.

Each repeat runs all four at every torch thread count asked for (``--threads``: 1 and torch's default, one
thread per core, unless told otherwise), so the counts share the machine's moods too.

The model is a Llama built from a config (hidden 256, 4 layers, vocab 512 by default), batches of
8 × 64 random tokens; the one trained block is layer 1 (``block_patterns``). The Lightning runs turn
off the logger, checkpointing, the progress bar and the model summary, so they time the training loop
(``--trainer-defaults`` keeps them). A run is timed from building its Trainer (or first optimizer) to
the end of training: wall clock, CPU seconds of this process, and the CPU seconds outside the model's
forward and backward (optimizer update, data, framework), which load from other processes on a busy
machine inflates least. Beside the whole run it prints the median step (from one forward to the next),
which leaves out what is paid once per turn or per round: the gap between the two is that cost.

    python benchmarks/overhead.py [--repeats 5] [--steps 80] [--threads 1,default] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from lightning import Trainer
from torch.utils.data import DataLoader, Dataset

from lightning_parablock import CausalLMModule, FederatedBlockStrategy, ParaBlockCallback

BLOCK = r"^model\.model\.layers\.1\."


class RandomTokens(Dataset):
    """Fixed random token sequences, every token a label."""

    def __init__(self, num_examples: int, length: int, vocab_size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(3, vocab_size, (num_examples, length), generator=generator)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def llama_config(hidden: int, layers: int, vocab: int, length: int) -> dict:
    return dict(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=length,
    )


@dataclass
class Timing:
    wall: float  # seconds
    cpu: float  # seconds of CPU this process used, all threads: what load from other processes inflates least
    model_cpu: float  # of which in the model's forward and in backward, the same work in every run
    steps: int
    median_step: float  # seconds from one forward to the next, the median: a step without turn or round work

    @property
    def outside_model_cpu(self) -> float:
        """CPU spent on everything but forward and backward: the optimizer update, data and the framework."""
        return self.cpu - self.model_cpu


class Stopwatch:
    """Times a run, and on the main thread the CPU inside ``model``'s forward and inside ``Tensor.backward``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.model_cpu = 0.0
        self.forward_starts: list[float] = []

    def __enter__(self) -> "Stopwatch":
        self._hooks = [
            self.model.register_forward_pre_hook(lambda *_: self._forward()),
            self.model.register_forward_hook(lambda *_: self._stop()),
        ]
        self._backward = torch.Tensor.backward

        def backward(tensor: torch.Tensor, *args, **kwargs) -> None:
            self._start()
            try:
                self._backward(tensor, *args, **kwargs)
            finally:
                self._stop()

        torch.Tensor.backward = backward
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exception) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        torch.Tensor.backward = self._backward
        for hook in self._hooks:
            hook.remove()

    def _forward(self) -> None:
        self.forward_starts.append(time.perf_counter())
        self._start()

    def _start(self) -> None:
        self._started = time.thread_time()

    def _stop(self) -> None:
        self.model_cpu += time.thread_time() - self._started

    def timing(self, steps: int) -> Timing:
        starts = self.forward_starts
        median_step = statistics.median(b - a for a, b in zip(starts, starts[1:])) if len(starts) > 1 else self.wall
        return Timing(self.wall, self.cpu, self.model_cpu, steps, median_step)


def freeze_all_but_block(module: CausalLMModule) -> None:
    for name, param in module.named_parameters():
        param.requires_grad_(re.search(BLOCK, name) is not None)


class Benchmark:
    def __init__(self, options: argparse.Namespace, root: str) -> None:
        self.options = options
        self.root = root  # where runs write their files
        self.config = llama_config(options.hidden, options.layers, options.vocab, options.length)
        self.data = RandomTokens(options.batch_size * options.steps, options.length, options.vocab)

    def module(self) -> CausalLMModule:
        return CausalLMModule(config=self.config, learning_rate=1e-3, seed=0)

    def loader(self) -> DataLoader:
        return DataLoader(
            self.data, batch_size=self.options.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
        )

    def trainer(self, **settings) -> Trainer:
        if self.options.trainer_defaults:  # what a user comparing with defaults sees; files go to a temporary folder
            quiet = dict(default_root_dir=self.root)
        else:
            quiet = dict(
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=self.root,  # the timeline file, written without a logger
            )
        return Trainer(accelerator=self.options.device, devices=1, num_sanity_val_steps=0, **quiet, **settings)

    def bare(self) -> Timing:
        module = self.module()
        model = module.model.to(self.device)
        model.train()
        freeze_all_but_block(module)
        block = [p for p in module.parameters() if p.requires_grad]
        with Stopwatch(module.model) as watch:
            steps = 0
            for batch in self.loader():
                if steps % self.options.local_steps == 0:
                    optimizer = torch.optim.AdamW(block, lr=1e-3)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
            self.synchronize()
        return watch.timing(steps)

    def strategy(self, clients: int, rounds: int) -> Timing:
        module = self.module()
        with Stopwatch(module.model) as watch:
            trainer = self.trainer(
                strategy=FederatedBlockStrategy(
                    num_clients=clients, local_steps=self.options.local_steps, block_patterns=[BLOCK], seed=0
                ),
                callbacks=[ParaBlockCallback(staleness=1)],
                max_epochs=rounds,
            )
            trainer.fit(module, train_dataloaders=self.loader())
            self.synchronize()
        return watch.timing(trainer.global_step)

    def lightning(self) -> Timing:
        module = self.module()
        freeze_all_but_block(module)
        with Stopwatch(module.model) as watch:
            trainer = self.trainer(max_steps=self.options.steps)
            trainer.fit(module, train_dataloaders=self.loader())
            self.synchronize()
        return watch.timing(trainer.global_step)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.options.device == "gpu" else self.options.device)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


RunTimings = dict[str, list[Timing]]  # run name -> one timing per repeat


def report(timings: RunTimings, many: str) -> None:
    """Per step: the whole run's and the median step's, on each clock; the ratios the targets are stated in."""

    def per_step(name: str, clock: str) -> float:
        return statistics.median(getattr(t, clock) / t.steps for t in timings[name]) * 1e3

    def median_step(name: str) -> float:
        return statistics.median(t.median_step for t in timings[name]) * 1e3

    print(
        f"{'ms per step':22s} {'steps':>5s} {'wall, whole run':>16s} {'wall, median step':>18s}"
        f" {'CPU':>7s} {'CPU outside fwd/bwd':>20s}"
    )
    for name, runs in timings.items():
        print(
            f"{name:22s} {runs[0].steps:5d} {per_step(name, 'wall'):16.2f} {median_step(name):18.2f}"
            f" {per_step(name, 'cpu'):7.2f} {per_step(name, 'outside_model_cpu'):20.2f}"
        )

    def paired(name: str, baseline: str, seconds_per_step: Callable[[Timing], float]) -> str:
        """The ratio within each repeat (its runs ran minutes apart at most), and the median of those."""
        ratios = [seconds_per_step(a) / seconds_per_step(b) for a, b in zip(timings[name], timings[baseline])]
        return f"{statistics.median(ratios):.3f}  (per repeat: {', '.join(f'{r:.3f}' for r in ratios)})"

    clocks: dict[str, Callable[[Timing], float]] = {
        "wall, whole run": lambda t: t.wall / t.steps,
        "wall, median step": lambda t: t.median_step,
        "cpu, whole run": lambda t: t.cpu / t.steps,
    }
    for clock, seconds_per_step in clocks.items():
        print(f"{clock}, median of each repeat's ratio:")
        print(f"  strategy N=1 / bare loop per step: {paired('strategy, N=1', 'bare PyTorch loop', seconds_per_step)}")
        print(f"  plain Lightning / bare loop per step: {paired('plain Lightning', 'bare PyTorch loop', seconds_per_step)}")
        print(f"  {many.replace('strategy, ', 'strategy ')} / N=1 per step: {paired(many, 'strategy, N=1', seconds_per_step)}")
    # Forward and backward do the same work in every run; what load does to them differs from run to run.
    # With them set to the bare loop's median, the ratios show the framework's cost alone.
    model = per_step("bare PyTorch loop", "model_cpu")
    outside = {name: per_step(name, "outside_model_cpu") for name in timings}
    bare, one = model + outside["bare PyTorch loop"], model + outside["strategy, N=1"]
    print(f"CPU, forward/backward at the bare loop's median ({model:.2f} ms/step):")
    print(f"  strategy N=1 / bare loop per step: {one / bare:.3f}")
    print(f"  plain Lightning / bare loop per step: {(model + outside['plain Lightning']) / bare:.3f}")
    print(f"  {many.replace('strategy, ', 'strategy ')} / N=1 per step: {(model + outside[many]) / one:.3f}")
    print("every run, wall / CPU seconds:")
    for name, runs in timings.items():
        print(f"  {name:22s} {'  '.join(f'{t.wall:.2f}/{t.cpu:.2f}' for t in runs)}")


def thread_counts(option: str, default: int) -> list[int]:
    """``"1,default"`` -> ``[1, default]``, in order, each count once."""
    counts = [default if part.strip() == "default" else int(part) for part in option.split(",")]
    return list(dict.fromkeys(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps of the bare loop and N=1")
    parser.add_argument("--local-steps", type=int, default=8, help="steps per turn (K)")
    parser.add_argument("--clients", type=int, default=10, help="N of the many-client run (two rounds)")
    parser.add_argument(
        "--threads", default="1,default", help="torch thread counts, comma-separated; 'default' is torch's own"
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="'cpu' or 'gpu'")
    parser.add_argument(
        "--trainer-defaults",
        action="store_true",
        help="keep the Trainer's logger, checkpointing (every epoch, so every round), progress bar and model summary",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model, 16 steps, 1 repeat: checks it runs")
    options = parser.parse_args()
    if options.quick:
        options.repeats, options.steps, options.local_steps, options.clients = 1, 16, 4, 2
        options.hidden, options.layers, options.vocab, options.length = 32, 2, 64, 16
    if options.steps % options.local_steps:
        parser.error(f"--steps ({options.steps}) must be a multiple of --local-steps ({options.local_steps})")
    default_threads = torch.get_num_threads()  # OMP_NUM_THREADS if set, else one per core
    counts = thread_counts(options.threads, default_threads)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # "GPU available", tips: once per run
    warnings.filterwarnings("ignore", message=".*(val_dataloader|LeafSpec).*")

    with tempfile.TemporaryDirectory(prefix="parablock-overhead-") as root:
        timings = measure(Benchmark(options, root), options, counts)
    for threads, runs in timings.items():
        default = " (torch's default here)" if threads == default_threads else ""
        print(f"\n=== {threads} torch thread{'s' if threads > 1 else ''}{default} ===")
        report(runs, many=f"strategy, N={options.clients}")
    print(
        f"\ntorch {torch.__version__}, device {options.device}, {os.cpu_count()} CPUs,"
        f" torch's default {default_threads} threads; command: {shlex.join([sys.executable, *sys.argv])}"
    )


def measure(bench: Benchmark, options: argparse.Namespace, counts: list[int]) -> dict[int, RunTimings]:
    """Every run once to warm up, then ``repeats`` rounds of all runs at every thread count, in alternating order."""
    runs: dict[str, Callable[[], Timing]] = {
        "bare PyTorch loop": bench.bare,
        "strategy, N=1": lambda: bench.strategy(1, options.steps // options.local_steps),
        "plain Lightning": bench.lightning,
        f"strategy, N={options.clients}": lambda: bench.strategy(options.clients, 2),
    }
    for threads in counts:  # warm-up: first-call costs (imports, allocator, thread teams) land in no timed run
        torch.set_num_threads(threads)
        for run in runs.values():
            run()
    timings: dict[int, RunTimings] = {threads: {name: [] for name in runs} for threads in counts}
    for repeat in range(options.repeats):
        for threads in counts if repeat % 2 == 0 else reversed(counts):
            torch.set_num_threads(threads)
            for name in list(runs) if repeat % 2 == 0 else list(reversed(runs)):
                timing = runs[name]()
                timings[threads][name].append(timing)
                print(  # as it comes: a run cut short by a time limit keeps what it measured
                    f"repeat {repeat + 1}, {threads} threads, {name}: {timing.wall:.2f} s,"
                    f" median step {timing.median_step * 1e3:.1f} ms, load average {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    return timings


if __name__ == "__main__":
    main()
