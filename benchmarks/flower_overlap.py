"""ParaBlock vs FedBCD over Flower on 127.0.0.1: measured wall-clock, exposed wait, and the exchange's parts.

Runs the tiny recipe twice as 2 sites x 2 clients over a real SuperLink, 2 SuperNodes and ``flwr run`` (see
``lightning_parablock.flower.demo.LocalFederation``): FedBCD (staleness 0: train, then exchange) and ParaBlock
(staleness 1: exchange round t - 1 while round t trains), with the same compute per round. Everything is measured
by the sites and the server (the federation's timeline), nothing modelled:

- c: a round's compute (the slower site's clients, one after another), mean over the rounds;
- m: the exchange's latency from "uploads ready" to "aggregate back" (the slower site), mean over the rounds, and
  its parts (ClientApp pickup, to the server, waiting for the other site, aggregation, push, SuperNode poll and
  ClientApp start, hand-over to the site);
- the wall-clock of the training rounds (the first round's start to the last round's boundary, over both sites;
  the final flush of Algorithm 2, one more exchange, is reported apart) and the exposed wait per round.

Targets (issue 28): with c >= m, ParaBlock's exposed wait is at most 5% of a round, and the measured
ParaBlock/FedBCD wall-clock ratio is within 0.05 of max(c, m) / (c + m) from the same runs' c and m.

    python benchmarks/flower_overlap.py [--quick] [--rounds 5] [--local_steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from common import TINY_RECIPE

from lightning_parablock.flower.demo import LocalFederation
from lightning_parablock.telemetry.timeline import MEASURED_EXCHANGE_PARTS as PARTS

RESULTS = Path(__file__).parent / "results"


def measure(method: str, rounds: int, overrides: dict, keep: bool) -> dict:
    """One federation of ``method``; what its timeline says."""
    folder = Path(tempfile.mkdtemp(prefix=f"pbb-{method}-", dir="/tmp"))
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    recipe["method"] = method
    try:
        with LocalFederation(
            folder, recipe, 2, rounds, 4, comm_timeout=600.0, overrides=overrides, log=lambda line: None
        ) as run:
            result = run.start().wait(timeout_s=1800)
        if result.server_code != 0 or result.site_codes != [0, 0]:
            raise RuntimeError(
                f"the {method} federation failed (sites {result.site_codes}, server {result.server_code}); see {folder}"
            )
        return summarize(json.loads(result.timeline.read_text()), rounds)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def summarize(timeline: dict, rounds: int) -> dict:
    flower = timeline["flower"]
    times = flower["round_times"]
    trained = [r for r in timeline["records"] if not r["flush"]]
    compute = [max(site["compute_seconds"] for site in r["ranks"].values()) for r in trained]
    waits = [r["exposed_wait_seconds"] for r in trained]
    round_walls = [
        max(times[s][str(t)]["ended_at"] - times[s][str(t)]["started_at"] for s in times) for t in range(rounds)
    ]
    wall = max(times[s][str(rounds - 1)]["ended_at"] for s in times) - min(times[s]["0"]["started_at"] for s in times)
    exchanges = [row for row in flower["exchanges"]]
    latency = [
        max(site["latency"] for site in row["sites"].values() if site["latency"] is not None) for row in exchanges
    ]
    parts = {
        part: statistics.mean(
            statistics.mean(v for site in row["sites"].values() if (v := site[part]) is not None) for row in exchanges
        )
        for part in PARTS
    }
    flush = [r for r in timeline["records"] if r["flush"]]
    return {
        "compute_per_round_s": statistics.mean(compute),
        "exchange_latency_s": statistics.mean(latency),
        "exchange_parts_s": parts,
        "exposed_wait_per_round_s": statistics.mean(waits),
        "exposed_wait_share_of_round": statistics.mean(w / r for w, r in zip(waits, round_walls)),
        "round_wall_s": round_walls,
        "training_wall_s": wall,
        "flush_s": sum(r["wall_seconds"] for r in flush),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds: a short check, not the figure to quote")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local_steps", type=int, default=8, help="steps per client per round: sets c")
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders (logs, timelines) in /tmp")
    options = parser.parse_args()
    rounds = 3 if options.quick else options.rounds
    overrides = {
        "strategy.local_steps": options.local_steps, "data.num_examples": options.examples,
        "data.val_examples": 16, "trainer.check_val_every_n_epoch": 1000,
    }  # fmt: skip
    load_before = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M")
    runs = {method: measure(method, rounds, overrides, options.keep) for method in ("fedbcd", "parablock")}
    load_after = os.getloadavg()[0]
    fedbcd, parablock = runs["fedbcd"], runs["parablock"]
    c_p, m_p = parablock["compute_per_round_s"], parablock["exchange_latency_s"]
    c_f, m_f = fedbcd["compute_per_round_s"], fedbcd["exchange_latency_s"]
    c, m = statistics.mean([c_f, c_p]), statistics.mean([m_f, m_p])
    predicted = max(c, m) / (c + m)
    measured = parablock["training_wall_s"] / fedbcd["training_wall_s"]
    lines = [
        f"flower_overlap ({started}, {os.cpu_count()} CPUs, load average {load_before:.1f} before,"
        f" {load_after:.1f} after;"
        f" {rounds} rounds, 2 sites x 2 clients, local_steps {options.local_steps})",
        f"{'':28}{'FedBCD':>10}{'ParaBlock':>11}",
    ]
    for key, label in [
        ("compute_per_round_s", "compute per round c (s)"),
        ("exchange_latency_s", "exchange latency m (s)"),
        ("exposed_wait_per_round_s", "exposed wait per round (s)"),
        ("exposed_wait_share_of_round", "  as a share of the round"),
        ("training_wall_s", "wall-clock, rounds (s)"),
        ("flush_s", "final flush (s)"),
    ]:
        lines.append(f"{label:28}{fedbcd[key]:>10.3f}{parablock[key]:>11.3f}")
    lines.append("exchange latency, its parts (s, mean over rounds and sites):")
    for part in PARTS:
        lines.append(
            f"  {part:26}{fedbcd['exchange_parts_s'][part]:>10.3f}{parablock['exchange_parts_s'][part]:>11.3f}"
        )
    spread = abs(c_f - c_p) / c
    per_run = max(c_p, m_p) / (c_f + m_f)
    lines += [
        f"ParaBlock/FedBCD measured {measured:.3f}; max(c, m)/(c + m) = {predicted:.3f}"
        f" (c {c:.2f}s, m {m:.2f}s, each the"
        f" two runs' mean); difference {abs(measured - predicted):.3f} (target <= 0.05)",
        f"the two runs' compute per round differs by {spread:.0%}"
        + (" (other work on this machine: re-measure on a quiet one)" if spread > 0.05 else ""),
        f"with each run's own c and m, max(c_P, m_P)/(c_F + m_F) = {per_run:.3f}; difference {abs(measured - per_run):.3f}",
        f"ParaBlock's exposed wait: {parablock['exposed_wait_share_of_round']:.1%} of a round"
        " (target <= 5% when c >= m;"
        f" here c {'>=' if c >= m else '<'} m)",
    ]
    print("\n".join(lines))
    if not options.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "flower_overlap.txt").write_text("\n".join(lines) + "\n")
        (RESULTS / "flower_overlap.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
