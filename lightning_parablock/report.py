"""``parablock report RUN_DIR``: the table and figures a researcher puts in a paper.

Reads the timeline a run wrote (``parablock_timeline.json``), prints measured and modelled
times at the bandwidths asked for, and draws a Figure-1-style Gantt chart of compute and
communication per client, a Figure-2-style runtime-vs-bandwidth bar chart of ParaBlock vs
FedBCD, and the loss curve.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from lightning_parablock.comm import SimulatedLink, parse_bandwidth
from lightning_parablock.timeline import (
    TIMELINE_FILENAME,
    RoundRecord,
    RunSummary,
    load_timeline,
    modelled_wallclock,
    overlap_efficiency,
)

DEFAULT_BANDWIDTHS = ("50MB/s", "100MB/s", "150MB/s")  # the paper's Figure 2
GANTT_ROUNDS = 4


def find_timeline(run_dir: Path) -> Path:
    """The timeline file itself, or the newest one under ``run_dir``."""
    if run_dir.is_file():
        return run_dir
    found = sorted(run_dir.rglob(TIMELINE_FILENAME), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"No {TIMELINE_FILENAME} under {str(run_dir)!r}; pass the directory of a run trained with"
            " ParaBlockCallback (its logger's log_dir or the Trainer's default_root_dir)."
        )
    return found[-1]


def _mean_loss(record: RoundRecord) -> Optional[float]:
    losses = list(record.client_loss.values())
    return sum(losses) / len(losses) if losses else None


def format_table(records: Sequence[RoundRecord], staleness: int, links: dict[str, SimulatedLink]) -> str:
    summary = RunSummary.of(records)
    parablock_staleness = max(staleness, 1)
    losses = [loss for loss in map(_mean_loss, records) if loss is not None]
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


def plot_gantt(records: Sequence[RoundRecord], link: SimulatedLink, staleness: int, path: Path) -> None:
    """Compute and communication per client over the first rounds, ParaBlock above FedBCD (modelled time)."""
    rounds = [r for r in records if not r.flush][:GANTT_ROUNDS]
    comm = {r.exchanged_round: r.client_link_seconds(link) for r in records if r.exchanged_round is not None}
    clients = sorted({c for r in rounds for c in r.participants})
    figure = Figure(figsize=(10, 1.2 + 0.9 * len(clients)))  # no pyplot: the user's backend stays untouched
    axes = figure.subplots(2, 1, sharex=True)
    for axis, s, title in ((axes[0], max(staleness, 1), "ParaBlock"), (axes[1], 0, "FedBCD")):
        start = 0.0
        for record in rounds:
            exchanged = comm.get(record.round - s, {})
            end = start
            for client in clients:
                row = clients.index(client)
                compute = record.compute_seconds.get(client, 0.0)
                comm_start = start if s > 0 else start + compute
                comm_seconds = exchanged.get(client, 0.0)
                if compute > 0:
                    axis.broken_barh([(start, compute)], (row - 0.35, 0.3), color="tab:blue")
                if comm_seconds > 0:
                    axis.broken_barh([(comm_start, comm_seconds)], (row + 0.05, 0.3), color="tab:orange")
                end = max(end, start + compute, comm_start + comm_seconds)
            axis.axvline(end, color="grey", linewidth=0.6, linestyle="--")
            axis.text((start + end) / 2, len(clients) - 0.4, f"round {record.round}", ha="center", fontsize=8)
            start = end
        axis.set_yticks(range(len(clients)), [f"client {c}" for c in clients])
        axis.set_ylim(-0.6, len(clients))
        axis.set_title(f"{title} (staleness {s})", fontsize=10)
    axes[1].set_xlabel(f"modelled seconds (link {link.bandwidth or 'unlimited'}, latency {link.latency})")
    handles = [Patch(color=c) for c in ("tab:blue", "tab:orange")]
    figure.legend(handles, ["compute (K local steps)", "communication (up + down)"], loc="lower center", ncol=2)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
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


def plot_loss(records: Sequence[RoundRecord], path: Path) -> None:
    points = [(r.round, loss) for r in records if not r.flush and (loss := _mean_loss(r)) is not None]
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    if points:
        axis.plot(*zip(*points), marker="o", markersize=3)
    axis.set_xlabel("round")
    axis.set_ylabel("mean client training loss")
    axis.set_title("Training loss")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def report(
    run_dir: Path, bandwidths: Sequence[str] = DEFAULT_BANDWIDTHS, latency: Optional[str] = None,
    output_dir: Optional[Path] = None,
) -> tuple[str, list[Path]]:  # fmt: skip
    """The printed table (headed by the timeline it read) and the paths of the PNGs written."""
    timeline = find_timeline(run_dir)
    try:
        meta, records = load_timeline(timeline)
        latency = latency if latency is not None else meta["link"]["latency"]
        staleness = meta["staleness"]
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{timeline} is not a timeline written by ParaBlockCallback ({error!r}).") from error
    if not records:
        raise ValueError(f"{timeline} holds no rounds yet.")
    if not bandwidths:
        raise ValueError("No bandwidth to model; pass e.g. --bandwidth 50MB/s,100MB/s.")
    for bandwidth in bandwidths:
        parse_bandwidth(bandwidth)  # a clear error before any figure is drawn
    links = {f"{b}, {latency}": SimulatedLink(b, latency) for b in bandwidths}
    output_dir = output_dir or timeline.parent
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / "gantt.png", output_dir / "runtime_vs_bandwidth.png", output_dir / "loss.png"]
    plot_gantt(records, next(iter(links.values())), staleness, paths[0])
    plot_runtime_vs_bandwidth(records, links, staleness, paths[1])
    plot_loss(records, paths[2])
    return f"timeline: {timeline}\n\n" + format_table(records, staleness, links), paths


def main(args: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="parablock report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run's directory, or its parablock_timeline.json")
    parser.add_argument(
        "--bandwidth",
        default=",".join(DEFAULT_BANDWIDTHS),
        help="comma-separated link bandwidths to model, e.g. 50MB/s,100MB/s,150MB/s",
    )
    parser.add_argument("--latency", default=None, help="link latency to model, e.g. 20ms (default: the run's)")
    parser.add_argument("--output-dir", type=Path, default=None, help="where to write the PNGs (default: beside the timeline)")
    options = parser.parse_args(args)
    bandwidths = [b.strip() for b in options.bandwidth.split(",") if b.strip()]
    try:
        table, paths = report(options.run_dir, bandwidths, options.latency, options.output_dir)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(table)
    print("\nfigures: " + ", ".join(str(p) for p in paths))
