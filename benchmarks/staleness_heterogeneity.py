"""The paper's Open Question 2: how ParaBlock's gap to FedBCD grows with client heterogeneity, and whether spacing helps.

Fine-tunes the model of benchmarks/pretrain_tiny.py on the task of ``benchmarks/table1.py --from-pretrained``
(same model, data, learning rate and link; effective batch 4) for every Dirichlet concentration α in ``--alphas``
("iid" for the iid split), every seed in ``--seeds`` (data, split, schedule and data order) and every variant in
``--variants``, each ``method:schedule``. ``parablock:spaced`` never trains a block trained in the last round, so
no client starts a round from its own still-unaggregated delta of the same block; ``fedbcd:spaced`` tells the
schedule's own effect apart from that (a ParaBlock variant is also compared with FedBCD on its own schedule). Each run's final validation loss
(the global model after the last flush) is written as one JSON file under ``--out``/runs and reused when present,
so several processes can share a sweep and a stopped sweep resumes. Prints, per α, each variant's mean ± standard
deviation over the seeds and the gap to FedBCD (paired by seed), and plots the gap against α.

    python benchmarks/staleness_heterogeneity.py [--alphas 0.01,0.1,0.5,iid] [--seeds 0,1,2]
        [--variants parablock:random,fedbcd:random,parablock:spaced] [--rounds 12] [--clients 8] [--local-steps 4]
        [--out runs/staleness] [--quick] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import table1
from matplotlib.figure import Figure

BASELINE = "fedbcd:random"


def run_once(alpha: str, seed: int, variant: str, options: argparse.Namespace) -> dict:
    name, schedule = variant.split(":")
    run = table1.build_parser().parse_args(
        ["--from-pretrained", "--rounds", str(options.rounds), "--clients", str(options.clients), "--local-steps",
         str(options.local_steps), "--examples", str(options.examples), "--val-examples", str(options.val_examples),
         "--seed", str(seed), "--schedule", schedule, "--out", str(options.out)]
        + (["--partition", "iid"] if alpha == "iid" else ["--alpha", alpha])
    )  # fmt: skip
    run.checkpoint = options.checkpoint
    started = time.perf_counter()
    module, data, trainer, _, _, _ = table1.train(name, run, table1.MAIN_BATCH, validate=False)
    loss = table1.final_val_loss(trainer, module, data)
    return {"alpha": alpha, "seed": seed, "variant": variant, "final_val_loss": loss,
            "seconds": time.perf_counter() - started}  # fmt: skip


def sweep(options: argparse.Namespace) -> None:
    folder = options.out / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    for alpha in options.alphas:
        for seed in options.seeds:
            for variant in options.variants:
                path = folder / f"alpha{alpha}_seed{seed}_{variant.replace(':', '-')}.json"
                if path.exists():
                    continue
                result = run_once(alpha, seed, variant, options)
                path.write_text(json.dumps(result))
                print(f"α={alpha} seed {seed} {variant}: {result['final_val_loss']:.4f}"
                      f" ({result['seconds']:.0f} s)", flush=True)  # fmt: skip


def load(folder: Path) -> dict[tuple[str, int, str], float]:
    results = (json.loads(path.read_text()) for path in sorted((folder / "runs").glob("*.json")))
    return {(r["alpha"], r["seed"], r["variant"]): r["final_val_loss"] for r in results}


def summarize(results: dict[tuple[str, int, str], float], options: argparse.Namespace) -> tuple[str, dict]:
    """The table, and per variant and α the paired gaps to FedBCD (ParaBlock / FedBCD − 1 per seed)."""
    lines = [f"{'alpha':>6} {'variant':18} {'final val loss (mean ± sd)':>27} {'gap to FedBCD (mean ± sd)':>27} seeds"]
    gaps: dict[str, dict[str, list[float]]] = {}
    for alpha in options.alphas:
        for variant in options.variants:
            seeds = [s for s in options.seeds if (alpha, s, variant) in results]
            if not seeds:
                continue
            losses = [results[alpha, s, variant] for s in seeds]
            paired = [results[alpha, s, variant] / results[alpha, s, BASELINE] - 1 for s in seeds
                      if (alpha, s, BASELINE) in results]  # fmt: skip
            gap_text = ""
            if variant != BASELINE and paired:
                gaps.setdefault(variant, {})[alpha] = paired
                gap_text = f"{statistics.mean(paired):+.2%} ± {_sd(paired):.2%}"
            lines.append(f"{alpha:>6} {variant:18} {statistics.mean(losses):>18.4f} ± {_sd(losses):.4f}"
                         f" {gap_text:>27} {','.join(map(str, seeds))}")  # fmt: skip
        for variant in options.variants:  # ParaBlock against FedBCD on the same schedule: staleness alone
            method, _, schedule = variant.partition(":")
            same = f"fedbcd:{schedule}"
            if method != "parablock" or same == BASELINE or same not in options.variants:
                continue
            paired = [results[alpha, s, variant] / results[alpha, s, same] - 1 for s in options.seeds
                      if (alpha, s, variant) in results and (alpha, s, same) in results]  # fmt: skip
            if paired:
                label = f"{variant} vs {same}"
                gaps.setdefault(label, {})[alpha] = paired
                lines.append(f"{alpha:>6} {label:36} {statistics.mean(paired):+.2%} ± {_sd(paired):.2%} (paired)")
    return "\n".join(lines), gaps


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def plot(gaps: dict[str, dict[str, list[float]]], alphas: list[str], path: Path) -> None:
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    positions = {alpha: i for i, alpha in enumerate(alphas)}
    for i, (variant, by_alpha) in enumerate(sorted(gaps.items())):
        xs = [positions[a] + (i - 1) * 0.08 for a in alphas if a in by_alpha]
        means = [100 * statistics.mean(by_alpha[a]) for a in alphas if a in by_alpha]
        spreads = [100 * _sd(by_alpha[a]) for a in alphas if a in by_alpha]
        label = variant if " vs " in variant else f"{variant} vs {BASELINE}"
        axis.errorbar(xs, means, yerr=spreads, marker="o", capsize=3, label=label)
        for a in alphas:
            if a in by_alpha:
                x = positions[a] + (i - 1) * 0.08
                axis.scatter([x] * len(by_alpha[a]), [100 * g for g in by_alpha[a]], s=8, alpha=0.4, color=f"C{i}")
    axis.axhline(0, color="black", linewidth=0.8)
    axis.axhspan(-2, 2, color="green", alpha=0.08, label="within 2%")
    axis.set_xticks(range(len(alphas)), [f"α={a}" if a != "iid" else "iid" for a in alphas])
    axis.set_xlabel("split of the fine-tuning task over clients (Dirichlet α over problem kind)")
    axis.set_ylabel("final val loss gap to FedBCD (%)")
    axis.set_title("Staleness × heterogeneity (mean ± sd over seeds; dots: seeds)", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alphas", default="0.01,0.1,0.5,iid", help="Dirichlet concentrations, or 'iid'")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="parablock:random,fedbcd:random,parablock:spaced")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--val-examples", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/staleness"))
    parser.add_argument("--quick", action="store_true", help="α 0.1 and iid, one seed, 2 rounds of 3 clients")
    parser.add_argument("--report-only", action="store_true", help="summarize the runs under --out, train none")
    options = parser.parse_args()
    options.alphas = [a.strip() for a in options.alphas.split(",")]
    options.seeds = [int(s) for s in options.seeds.split(",")]
    options.variants = [v.strip() for v in options.variants.split(",")]
    for alpha in options.alphas:
        if alpha != "iid" and not float(alpha) > 0:
            parser.error(f"--alphas takes positive numbers or 'iid', got {alpha!r}")
    for variant in options.variants:
        name, _, schedule = variant.partition(":")
        if name not in table1.BLOCK_METHODS or schedule not in table1.SCHEDULE_KINDS:
            parser.error(f"--variants takes method:schedule with a method of {table1.BLOCK_METHODS} and a schedule"
                         f" of {table1.SCHEDULE_KINDS}, got {variant!r}")  # fmt: skip
    if BASELINE not in options.variants:
        parser.error(f"--variants must include the baseline {BASELINE!r}, got {options.variants}")
    quick = table1.prepare(table1.build_parser().parse_args(["--from-pretrained"] + (["--quick"] * options.quick)))
    options.checkpoint = quick.checkpoint
    if options.quick:
        options.alphas, options.seeds = ["0.1", "iid"], [0]
        options.rounds, options.clients, options.local_steps = quick.rounds, quick.clients, quick.local_steps
        options.examples, options.val_examples = quick.examples, quick.val_examples
    if not options.report_only:
        sweep(options)
    table, gaps = summarize(load(options.out), options)
    print("\n" + table)
    figure = options.out / "staleness_heterogeneity.png"
    plot(gaps, options.alphas, figure)
    print(f"\nfigure: {figure}\ncheckpoint {options.checkpoint.name}, {options.rounds} rounds, {options.clients}"
          f" clients, {options.local_steps} local steps, effective batch {table1.MAIN_BATCH}")  # fmt: skip


if __name__ == "__main__":
    main()
