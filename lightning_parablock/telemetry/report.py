"""``parablock report RUN_DIR``: the table and figures a researcher puts in a paper.

Reads the timeline a run wrote (``parablock_timeline.json``), prints measured and modelled
times at the bandwidths asked for, and draws a Figure-1-style Gantt chart of compute and
communication per client, a Figure-2-style runtime-vs-bandwidth bar chart of ParaBlock vs
FedBCD, and the loss curve. ``--compare`` puts every run under a folder side by side, one row
per run labelled by its method (the timeline's ``method``; older timelines say only their staleness).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from lightning_parablock.comm.link import SimulatedLink, parse_bandwidth
from lightning_parablock.telemetry.timeline import (
    MEASURED_EXCHANGE_PARTS,
    TIMELINE_FILENAME,
    RoundRecord,
    RunSummary,
    load_timeline,
    modelled_wallclock,
    overlap_efficiency,
)

DEFAULT_BANDWIDTHS = ("50MB/s", "100MB/s", "150MB/s")  # the paper's Figure 2
GANTT_ROUNDS = 4  # shown by default; --rounds picks others
LOSS_KEYS = ("val/loss", "val_loss", "val/loss_epoch", "val_loss_epoch")
"""Validation loss as modules log it, in the order looked for (here and in the `parablock fit` summary)."""


def find_timelines(run_dir: Path) -> list[Path]:
    """The timeline file itself, or every one under ``run_dir``, oldest first."""
    if run_dir.is_file():
        return [run_dir]
    found = sorted(run_dir.rglob(TIMELINE_FILENAME), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"No {TIMELINE_FILENAME} under {str(run_dir)!r}; pass the directory of a run trained with"
            " ParaBlockCallback (its logger's log_dir or the Trainer's default_root_dir)."
        )
    return found


def find_timeline(run_dir: Path, run: Optional[str] = None) -> Path:
    """The newest timeline under ``run_dir``, or the one whose path contains ``run`` (e.g. ``version_1``)."""
    found = find_timelines(run_dir)
    if run is None:
        return found[-1]
    chosen = [path for path in found if run in str(path.relative_to(run_dir) if run_dir.is_dir() else path)]
    if len(chosen) != 1:
        listed = ", ".join(str(path.parent) for path in found)
        what = "matches none" if not chosen else f"matches {len(chosen)}"
        raise ValueError(f"--run {run!r} {what} of the runs under {str(run_dir)!r}: {listed}.")
    return chosen[0]


def parse_rounds(text: str) -> tuple[int, Optional[int]]:
    """``"0-7"`` → rounds 0 to 7, ``"5"`` → round 5, ``"all"`` → every round; as (first, last or None)."""
    if text.strip().lower() == "all":
        return 0, None
    try:
        first, _, last = text.partition("-")
        start, end = int(first), int(last) if last else int(first)
    except ValueError:
        raise ValueError(f"--rounds {text!r}: give a range such as 0-7, one round such as 5, or all.") from None
    if start < 0 or end < start:
        raise ValueError(f"--rounds {text!r}: the range must go up from round 0 or later, e.g. 0-7.")
    return start, end


def link_label(link: SimulatedLink) -> str:
    return f"{link.bandwidth if link.bandwidth is not None else 'unlimited bandwidth'}, latency {link.latency}"


def validation_losses(log_dir: Path, rounds: int) -> list[tuple[int, float]]:
    """(rounds completed, validation loss of the global model) from the logger files beside the timeline:
    metrics.csv, else TensorBoard events. A validation at step 0 came before training (0 rounds completed)."""
    logged: list[tuple[int, int, float]] = []  # (epoch, step, loss)
    csv_path = log_dir / "metrics.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as stream:
            rows = list(csv.DictReader(stream))
        key = next((k for k in LOSS_KEYS if rows and k in rows[0]), None)
        if key is not None:
            logged = [(int(float(r["epoch"])), int(float(r["step"])), float(r[key])) for r in rows if r.get(key)]
    elif any(log_dir.glob("events.out.tfevents.*")):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(log_dir))
        events.Reload()
        tags = events.Tags().get("scalars", [])
        key = next((k for k in LOSS_KEYS if k in tags), None)
        if key is not None and "epoch" in tags:
            epoch_at_step = {e.step: int(e.value) for e in events.Scalars("epoch")}
            logged = [(epoch_at_step.get(e.step, 0), e.step, e.value) for e in events.Scalars(key)]
    by_round = {0 if step == 0 else min(epoch + 1, rounds): loss for epoch, step, loss in logged}
    return sorted(by_round.items())


def method_label(meta: dict, path: Path) -> str:
    """A run's row label: its method and folder; a timeline written before methods were recorded gives its staleness."""
    method = meta.get("method") or f"staleness {meta.get('staleness')}"
    return f"{method} ({path.parent.name})"


def format_comparison(runs: Sequence[tuple[str, int, Sequence[RoundRecord]]], links: dict[str, SimulatedLink]) -> str:
    """One row per (label, staleness, records): rounds, final training loss, bytes, measured and modelled seconds.

    Each run's modelled time uses its own staleness: the methods as they ran, over the same links.
    """
    width = max(len(label) for label, _, _ in runs)
    header = f"{'run':<{width}}  {'rounds':>6}  {'train loss':>10}  {'MB moved':>9}  {'measured s':>10}"
    header += "".join(f"  {name + ' s':>{max(12, len(name) + 2)}}" for name in links)
    lines = [header]
    for label, staleness, records in runs:
        summary = RunSummary.of(records)
        losses = [loss for loss in (r.mean_client_loss for r in records) if loss is not None]
        loss = f"{losses[-1]:.4f}" if losses else "-"
        row = f"{label:<{width}}  {summary.rounds:>6}  {loss:>10}  {summary.bytes_moved / 1e6:>9.2f}"
        row += f"  {summary.measured_seconds:>10.2f}"
        row += "".join(
            f"  {modelled_wallclock(records, link, staleness):>{max(12, len(name) + 2)}.2f}" for name, link in links.items()
        )
        lines.append(row)
    return "\n".join(lines)


def compare(run_dir: Path, bandwidths: Sequence[str] = DEFAULT_BANDWIDTHS, latency: str = "0s") -> str:
    """Every run under ``run_dir`` side by side (oldest first), labelled by method."""
    links = {f"{b}, {latency}": SimulatedLink(b, latency) for b in bandwidths}
    runs = []
    for path in find_timelines(run_dir):
        meta, records = load_timeline(path)
        runs.append((method_label(meta, path), meta["staleness"], records))
    return "modelled federated wall-clock (clients in parallel), each run at its own staleness\n" + format_comparison(
        runs, links
    )


def format_measured_exchanges(meta: dict) -> list[str]:
    """Lines on the exchanges a real transport measured (a Flower server's timeline), or none.

    Latency is each round's slower site, from its uploads being ready to the aggregate being back; the parts are
    means over rounds and sites, each between two processes' stamps.
    """
    rows = (meta.get("flower") or {}).get("exchanges") or []
    latencies = [
        max(values) for row in rows if (values := [s["latency"] for s in row["sites"].values() if s.get("latency") is not None])
    ]
    if not latencies:
        return []
    lines = [
        f"measured exchanges ({meta.get('transport', 'a real transport')}, {meta['flower'].get('sites')} sites):"
        f" uploads ready to aggregate back, slower site: mean {sum(latencies) / len(latencies):.2f} s"
        f" (min {min(latencies):.2f}, max {max(latencies):.2f}) over {len(latencies)} exchanges"
    ]
    means = []
    for part in MEASURED_EXCHANGE_PARTS:
        values = [s[part] for row in rows for s in row["sites"].values() if s.get(part) is not None]
        if values:
            means.append(f"{part} {sum(values) / len(values):.2f}")
    if means:
        lines.append("  its parts, mean s: " + ", ".join(means))
    return lines


def format_table(records: Sequence[RoundRecord], staleness: int, links: dict[str, SimulatedLink]) -> str:
    summary = RunSummary.of(records)
    parablock_staleness = max(staleness, 1)
    losses = [loss for loss in (r.mean_client_loss for r in records) if loss is not None]
    lines = [
        f"rounds                      {summary.rounds}",
        f"staleness of the run        {staleness}",
        f"bytes moved                 {summary.bytes_moved / 1e6:.2f} MB",
        f"measured time               {summary.measured_seconds:.2f} s  (this process, clients one after another)",
        f"  compute                   {summary.compute_seconds:.2f} s",
        f"  exposed comm wait         {summary.exposed_wait_seconds:.2f} s",
        f"overlap efficiency          {overlap_efficiency(records):.3f}  (max(compute, comm) / round time)",
    ]
    if losses:
        lines.append(f"train loss, first -> last   {losses[0]:.4f} -> {losses[-1]:.4f}")
    lines += [
        "",
        "modelled federated wall-clock (clients in parallel)",
        f"{'link':>24}  {'ParaBlock (s=' + str(parablock_staleness) + ')':>16}  {'FedBCD (s=0)':>14}  {'saved':>7}",
    ]
    for name, link in links.items():
        parablock = modelled_wallclock(records, link, parablock_staleness)
        fedbcd = modelled_wallclock(records, link, 0)
        saved = 1 - parablock / fedbcd if fedbcd > 0 else 0.0
        lines.append(f"{name:>24}  {parablock:>14.2f} s  {fedbcd:>12.2f} s  {saved:>6.1%}")
    return "\n".join(lines)


def plot_gantt(
    records: Sequence[RoundRecord], link: SimulatedLink, staleness: int, path: Path,
    rounds: tuple[int, Optional[int]] = (0, GANTT_ROUNDS - 1),
) -> None:  # fmt: skip
    """Compute and communication per client over ``rounds`` (first, last), ParaBlock above FedBCD, in modelled
    time over ``link``; each bar is labelled with its seconds."""
    first, last = rounds
    shown = [r for r in records if not r.flush and r.round >= first and (last is None or r.round <= last)]
    if not shown:
        known = [r.round for r in records if not r.flush]
        raise ValueError(f"--rounds {first}-{last if last is not None else ''} selects none of the run's rounds {known[0]}-{known[-1]}.")
    comm = {r.exchanged_round: r.client_link_seconds(link) for r in records if r.exchanged_round is not None}
    clients = sorted({c for r in shown for c in r.participants})
    figure = Figure(figsize=(max(10, 1.6 * len(shown)), 1.6 + 0.9 * len(clients)))  # no pyplot: the user's backend stays untouched
    axes = figure.subplots(2, 1, sharex=True)
    for axis, s, title in ((axes[0], max(staleness, 1), "ParaBlock"), (axes[1], 0, "FedBCD")):
        start = 0.0
        bars = []
        for record in shown:
            exchanged = comm.get(record.round - s, {})
            end = start
            for row, client in enumerate(clients):
                compute = record.compute_seconds.get(client, 0.0)
                comm_start = start if s > 0 else start + compute
                comm_seconds = exchanged.get(client, 0.0)
                if compute > 0:
                    bars.append((start, compute, row - 0.35, "tab:blue"))
                if comm_seconds > 0:
                    bars.append((comm_start, comm_seconds, row + 0.05, "tab:orange"))
                end = max(end, start + compute, comm_start + comm_seconds)
            axis.axvline(end, color="grey", linewidth=0.6, linestyle="--")
            axis.text((start + end) / 2, len(clients) - 0.4, f"round {record.round}", ha="center", fontsize=8)
            start = end
        for left, width, bottom, color in bars:
            axis.broken_barh([(left, width)], (bottom, 0.3), color=color)
            if width > 0.04 * start:  # a label only where it fits
                axis.text(left + width / 2, bottom + 0.15, f"{width:.2g}s", ha="center", va="center", fontsize=6, color="white")
        axis.set_yticks(range(len(clients)), [f"client {c}" for c in clients])
        axis.set_ylim(-0.6, len(clients))
        axis.set_title(f"{title} (staleness {s}), modelled", fontsize=10)
    axes[1].set_xlabel(f"modelled seconds over the link {link_label(link)}")
    handles = [Patch(color=c) for c in ("tab:blue", "tab:orange")]
    labels = ["compute (K local steps, measured)", "communication (up + down, modelled)"]
    figure.legend(handles, labels, loc="lower center", ncol=2)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path, dpi=120)


def plot_runtime_vs_bandwidth(
    records: Sequence[RoundRecord], links: dict[str, SimulatedLink], staleness: int, path: Path
) -> None:
    names = list(links)
    parablock = [modelled_wallclock(records, links[n], max(staleness, 1)) for n in names]
    fedbcd = [modelled_wallclock(records, links[n], 0) for n in names]
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    positions = range(len(names))
    axis.bar([p - 0.2 for p in positions], parablock, width=0.4, label="ParaBlock", color="tab:green")
    axis.bar([p + 0.2 for p in positions], fedbcd, width=0.4, label="FedBCD", color="tab:grey")
    axis.set_xticks(list(positions), names)
    axis.set_xlabel("bandwidth")
    axis.set_ylabel("modelled wall-clock (s)")
    axis.set_title("Runtime vs bandwidth (clients in parallel)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_loss(records: Sequence[RoundRecord], path: Path, validation: Sequence[tuple[int, float]] = ()) -> None:
    """Mean client training loss during each round (at the round's end), with the global model's validation
    loss where it was logged."""
    points = [(r.round + 1, loss) for r in records if not r.flush and (loss := r.mean_client_loss) is not None]
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    if points:
        axis.plot(*zip(*points), marker="o", markersize=3, label="training (mean over clients)")
    if validation:
        axis.plot(*zip(*validation), marker="s", markersize=4, label="validation (global model)")
    axis.set_xlabel("rounds completed")
    axis.set_ylabel("loss")
    axis.set_title("Loss per round")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def report(
    run_dir: Path, bandwidths: Sequence[str] = DEFAULT_BANDWIDTHS, latency: Optional[str] = None,
    output_dir: Optional[Path] = None, rounds: tuple[int, Optional[int]] = (0, GANTT_ROUNDS - 1),
    run: Optional[str] = None,
) -> tuple[str, list[Path]]:  # fmt: skip
    """The printed table (headed by the timeline it read) and the paths of the PNGs written."""
    timeline = find_timeline(run_dir, run)
    try:
        meta, records = load_timeline(timeline)
        own_link = SimulatedLink(meta["link"].get("bandwidth"), meta["link"]["latency"])
        latency = latency if latency is not None else meta["link"]["latency"]
        staleness = meta["staleness"]
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as error:
        raise ValueError(f"{timeline} is not a timeline written by ParaBlockCallback ({error!r}).") from error
    if not records:
        raise ValueError(f"{timeline} holds no rounds yet.")
    if not bandwidths:
        raise ValueError("No bandwidth to model; pass e.g. --bandwidth 50MB/s,100MB/s.")
    for bandwidth in bandwidths:
        parse_bandwidth(bandwidth, "bandwidth")  # a clear error before any figure is drawn
    links = {f"{b}, {latency}": SimulatedLink(b, latency) for b in bandwidths}
    output_dir = output_dir or timeline.parent
    validation = validation_losses(timeline.parent, RunSummary.of(records).rounds)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / "gantt.png", output_dir / "runtime_vs_bandwidth.png", output_dir / "loss.png"]
    plot_gantt(records, own_link, staleness, paths[0], rounds)
    plot_runtime_vs_bandwidth(records, links, staleness, paths[1])
    plot_loss(records, paths[2], validation)
    others = [path for path in find_timelines(run_dir) if path != timeline]
    lines = [f"timeline: {timeline}"]
    if others:
        lines.append(f"  (also under {run_dir}: {', '.join(str(p.parent) for p in others)}; choose one with --run)")
    lines.append(f"method: {meta.get('method') or 'not recorded'}; this run's link: {link_label(own_link)}")
    lines += format_measured_exchanges(meta)
    if validation:
        (first_round, first), (last_round, last) = validation[0], validation[-1]
        lines.append(f"validation loss {first:.4f} after {first_round} rounds -> {last:.4f} after {last_round}")
    return "\n".join(lines) + "\n\n" + format_table(records, staleness, links), paths


def main(
    args: Optional[Sequence[str]] = None, *, parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
) -> None:
    """Parse ``parablock report``'s arguments and print and draw the run; errors go to ``parser_class.error``
    (the ``parablock`` command passes one that prints them as its other commands do)."""
    parser = parser_class(prog="parablock report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run's directory (or a folder of runs), or its parablock_timeline.json")
    parser.add_argument("--run", default=None, help="which run under run_dir, by a part of its path, e.g. version_1 (default: the newest)")
    parser.add_argument(
        "--bandwidth",
        default=",".join(DEFAULT_BANDWIDTHS),
        help="comma-separated link bandwidths to model in the table, e.g. 50MB/s,100MB/s,150MB/s",
    )
    parser.add_argument("--latency", default=None, help="link latency to model, e.g. 20ms (default: the run's)")
    parser.add_argument("--rounds", default=f"0-{GANTT_ROUNDS - 1}", help="rounds the Gantt chart shows: 0-7, 5 or all (default: %(default)s)")
    parser.add_argument("--output_dir", "--output-dir", type=Path, default=None, help="where to write the PNGs (default: beside the timeline)")
    parser.add_argument("--compare", action="store_true", help="print every run under run_dir side by side, one row per run labelled by its method")
    options = parser.parse_args(args)
    bandwidths = [b.strip() for b in options.bandwidth.split(",") if b.strip()]
    try:
        if options.compare:
            print(compare(options.run_dir, bandwidths, options.latency or "0s"))
            return
        rounds = parse_rounds(options.rounds)
        table, paths = report(options.run_dir, bandwidths, options.latency, options.output_dir, rounds, options.run)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(table)
    print("\nfigures: " + ", ".join(str(p) for p in paths))
