"""Measure what several processes buy: per-round time of 1 process × 4 clients vs 2 processes × 2 clients,
and how much of a real collective's (emulated) link time ParaBlock hides behind compute.

Every run is a separate `python benchmarks/scaling.py --worker ...` launched as users launch (Lightning's
launcher starts rank 1), one torch thread per process, the tiny Llama of recipes/tiny.yaml on synthetic
arithmetic. The figures are medians over rounds 1.. (round 0 pays for start-up), per run, and the
runs alternate across repeats so that load on a shared machine hits every configuration alike.

    python benchmarks/scaling.py [--repeats 3] [--rounds 8] [--local_steps 6]

Prints, per configuration, the median round seconds of each repeat; then the 2-process / 1-process
ratio (target ≤ 0.55) beside the same ratio for a bare PyTorch loop (two plain processes sharing the
machine: what the hardware itself allows) and, with a link emulated so that an exchange costs about a round's compute,
ParaBlock's round time against max(compute, comm) (target ≤ 1.05×) and ParaBlock / FedBCD against
max(c, m) / (c + m).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import TIMING_ONLY, TINY_CONFIG

HERE = Path(__file__).resolve()


def worker(args: argparse.Namespace) -> None:
    """One training run (rank 0 and, through Lightning's launcher, rank 1); rank 0 writes the records."""
    import torch
    from lightning import Trainer

    from lightning_parablock import CausalLMModule, FederatedBlockStrategy, ParaBlockCallback, SimulatedLink
    from lightning_parablock.data import SyntheticArithmeticDataModule

    torch.set_num_threads(1)
    config = TINY_CONFIG
    callback = ParaBlockCallback(staleness=args.staleness, link=SimulatedLink(latency=args.latency))
    trainer = Trainer(
        strategy=FederatedBlockStrategy(num_clients=4, local_steps=args.local_steps, seed=0),
        callbacks=[callback],
        max_epochs=args.rounds,
        accelerator="cpu",
        devices=args.devices,
        **TIMING_ONLY,
    )
    data = SyntheticArithmeticDataModule(num_examples=400, val_examples=0, batch_size=16, partition="iid", seed=0)
    trainer.fit(CausalLMModule(config=config, learning_rate=3e-3, seed=0), datamodule=data)
    if trainer.is_global_zero:
        rounds = [r for r in callback.records if not r.flush][1:]
        result = {
            "round_s": statistics.median(r.wall_seconds for r in rounds),
            "compute_s": statistics.median(
                max(r.ranks[k]["compute_seconds"] for k in r.ranks) if r.ranks else sum(r.compute_seconds.values())
                for r in rounds
            ),
            "link_s": statistics.median(r.link_seconds for r in callback.records if r.exchanged_round is not None),
        }
        Path(args.out).write_text(json.dumps(result))


def bare_worker(args: argparse.Namespace) -> None:
    """A plain PyTorch loop on the same model (one decoder layer trained, AdamW, one thread): the hardware's own speed."""
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = TINY_CONFIG
    model = LlamaForCausalLM(LlamaConfig(**config))
    for name, param in model.named_parameters():
        param.requires_grad_(".layers.1." in name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokens = torch.randint(3, config["vocab_size"], (16, 32))
    for step in range(args.bare_steps + 3):  # 3 warm-up steps, untimed
        if step == 3:
            start = time.perf_counter()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    Path(args.out).write_text(json.dumps({"seconds": time.perf_counter() - start}))


def launch_bare(processes: int, steps: int) -> float:
    """``processes`` bare loops at once, ``steps / processes`` steps each; the slowest one's seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"bare{i}.json" for i in range(processes)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        running = [
            subprocess.Popen(
                [sys.executable, str(HERE), "--worker", "--bare_steps", str(steps // processes), "--out", str(out)],
                cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for out in outs
        ]  # fmt: skip
        for process in running:
            if process.wait(timeout=900):
                raise RuntimeError(f"a bare loop exited with {process.returncode}")
        return max(json.loads(out.read_text())["seconds"] for out in outs)


def launch(devices: int, staleness: int, latency: float, rounds: int, local_steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [
            sys.executable, str(HERE), "--worker", "--out", str(out), "--devices", str(devices),
            "--staleness", str(staleness), "--latency", f"{latency}s", "--rounds", str(rounds),
            "--local_steps", str(local_steps),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(command, cwd=tmp, env=env, check=True, timeout=900, capture_output=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local_steps", type=int, default=6)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--staleness", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--latency", default="0s", help=argparse.SUPPRESS)
    parser.add_argument("--bare_steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        bare_worker(args) if args.bare_steps else worker(args)
        return
    print(
        f"command: python benchmarks/scaling.py --repeats {args.repeats} --rounds {args.rounds} --local_steps {args.local_steps}"
    )

    # 1. Scaling: the same 4 clients on one process or two (no link time).
    one, two, bare_one, bare_two = [], [], [], []
    bare_steps = 4 * args.local_steps * args.rounds  # as many steps as the federation's rounds take
    for _ in range(args.repeats):
        one.append(launch(1, 1, 0.0, args.rounds, args.local_steps))
        two.append(launch(2, 1, 0.0, args.rounds, args.local_steps))
        bare_one.append(launch_bare(1, bare_steps))
        bare_two.append(launch_bare(2, bare_steps))
    one_s = statistics.median(r["round_s"] for r in one)
    two_s = statistics.median(r["round_s"] for r in two)
    print(f"1 process x 4 clients: round {[round(r['round_s'], 3) for r in one]} s, median {one_s:.3f} s")
    print(f"2 processes x 2 clients: round {[round(r['round_s'], 3) for r in two]} s, median {two_s:.3f} s")
    print(f"2-process / 1-process round time: {two_s / one_s:.3f} (target <= 0.55)")
    hardware = statistics.median(b / a for a, b in zip(bare_one, bare_two))
    print(
        f"the same for a bare PyTorch loop ({bare_steps} steps on 1 process vs half each on 2 at once):"
        f" {[round(b / a, 3) for a, b in zip(bare_one, bare_two)]}, median {hardware:.3f} (this machine's own limit)"
    )

    # 2. Overlap: a link emulated on top of the real collective so that an exchange costs one round's compute.
    compute = statistics.median(r["compute_s"] for r in two)
    latency = compute / 2  # latency each way, upload then download
    para, bcd = [], []
    for _ in range(args.repeats):
        para.append(launch(2, 1, latency, args.rounds, args.local_steps))
        bcd.append(launch(2, 0, latency, args.rounds, args.local_steps))
    para_s = statistics.median(r["round_s"] for r in para)
    bcd_s = statistics.median(r["round_s"] for r in bcd)
    comm = statistics.median(r["link_s"] for r in para)
    c = statistics.median(r["compute_s"] for r in para)
    ideal = max(c, comm)
    print(f"compute per round c = {c:.3f} s, emulated comm per exchange m = {comm:.3f} s")
    print(f"ParaBlock (s=1) round: {[round(r['round_s'], 3) for r in para]} s, median {para_s:.3f} s")
    print(f"FedBCD (s=0) round: {[round(r['round_s'], 3) for r in bcd]} s, median {bcd_s:.3f} s")
    print(f"ParaBlock round / max(c, m): {para_s / ideal:.3f} (target <= 1.05)")
    print(
        f"ParaBlock / FedBCD: {para_s / bcd_s:.3f} vs max(c, m) / (c + m) = {ideal / (c + comm):.3f} (target: within 0.05)"
    )


if __name__ == "__main__":
    main()
