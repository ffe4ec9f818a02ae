"""Figure 2 measured, not modelled: ParaBlock against FedBCD over a real bandwidth-limited link between two nodes.

Two Linux network namespaces joined by a veth pair stand for two machines; each end's egress is shaped by a
``tbf`` qdisc to the rate under test (both directions, full duplex). One rank runs in each namespace, started
the way a two-machine job starts: ``python real_link.py --worker`` on each "node" with ``NODE_RANK``,
``MASTER_ADDR`` (rank 0's address on the link), ``MASTER_PORT`` and ``WORLD_SIZE`` set, and
``Trainer(num_nodes=2, devices=1)``; ``GLOO_SOCKET_IFNAME`` names the link, so rendezvous, Lightning's group and
the exchange group all cross it and nothing else (a namespace has no other way out). The run fine-tunes
benchmarks/pretrain_tiny.py's checkpoint (3.16 MB fp32 blocks), one client per node, at several rates chosen so
that one exchange ranges from well under a round's compute to well over it. ``netem`` is not available on the
machines this was written on, so no latency is added: the link is bandwidth only.

Per rate and method the table gives the measured seconds of the whole run (rounds and the final flush, from the
timeline's round records), the exposed wait per round (the longest any node's main thread was blocked at the
boundary, and the part of it that lengthened the round), and the modelled seconds of the same run: ``modelled_wallclock`` over that run's own records at a ``SimulatedLink`` of
the link's rate. The model's client uploads its block and then downloads the aggregate (2 blocks' time per
exchange); two peers all-reducing over a full-duplex link send and receive one block each way at once, in one
block's time. So the model at the shaped rate R over-states what the wire costs by 2×, and the prediction for this
link is the model at 2R; both are printed, the per-exchange seconds measured on the comm thread beside them, and
the targets are checked: measured ParaBlock/FedBCD within 0.05 of the predicted ratio, and ParaBlock's wait on
the critical path ≤ 5 % of a round where one exchange takes less than a round's compute. A sampler in each
namespace reads the veth's byte counters every 20 ms: the peak throughput over 0.5 s windows shows the link really
was limited.

Needs root (CAP_NET_ADMIN) and ``ip netns``; without them it prints why and exits 0 having done nothing. Every
namespace, link and process it made is removed on the way out, on errors and on SIGTERM/SIGINT too; namespaces
left by a run that was SIGKILLed are removed by the next run.

    sudo python benchmarks/real_link.py [--rates 1,2,5,20,100] [--rounds 10] [--local_steps 4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve()
ADDRESSES = ("10.213.0.1", "10.213.0.2")  # inside the namespaces only: nothing outside them sees these
PREFIX = "plb"  # namespaces plb<pid>n<rank>, veth ends plb<pid>v<rank> (15 characters at most)
SAMPLE_S = 0.02
PEAK_WINDOW_S = 0.5
RUN_TIMEOUT_S = 900.0
METHODS = (("ParaBlock", 1), ("FedBCD", 0))
SKIPPED = "real_link: skipped:"


class LinkUnavailable(RuntimeError):
    """This machine (or user) cannot make network namespaces."""


# ----------------------------------------------------------------------------------------------------- the link


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class NamespaceLink:
    """Two network namespaces joined by a veth pair whose ends are shaped by ``tbf``; removed when the block ends.

    Rank ``i`` lives in ``self.namespaces[i]`` at ``ADDRESSES[i]`` on interface ``self.interfaces[i]``.
    """

    def __init__(self) -> None:
        tag = f"{PREFIX}{os.getpid()}"
        self.namespaces = (f"{tag}n0", f"{tag}n1")
        self.interfaces = (f"{tag}v0", f"{tag}v1")
        self.bytes_per_second: Optional[float] = None

    def __enter__(self) -> "NamespaceLink":
        remove_stale_namespaces()
        try:
            for namespace in self.namespaces:
                _ip("netns", "add", namespace)
            _ip("link", "add", self.interfaces[0], "type", "veth", "peer", "name", self.interfaces[1])
            for namespace, interface, address in zip(self.namespaces, self.interfaces, ADDRESSES):
                _ip("link", "set", interface, "netns", namespace)
                _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
                _ip("-n", namespace, "link", "set", interface, "up")
                _ip("-n", namespace, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def shape(self, bytes_per_second: float) -> None:
        """Limit each direction to ``bytes_per_second``: a bucket of 5 ms of traffic (at least 16 KB), a queue of 20 ms
        (a deeper one would hold the small messages of the turn agreement behind a block's packets)."""
        burst = max(16_000, int(bytes_per_second * 0.005))
        for namespace, interface in zip(self.namespaces, self.interfaces):
            command = ["netns", "exec", namespace, "tc", "qdisc", "replace", "dev", interface, "root", "tbf"]
            _ip(*command, "rate", f"{int(bytes_per_second * 8)}bit", "burst", str(burst), "latency", "20ms")
        self.bytes_per_second = bytes_per_second

    def start(self, rank: int, command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """``command`` inside rank ``rank``'s namespace, in a session of its own (killed as a group)."""
        with log.open("wb") as output:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.namespaces[rank], *command],
                env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def remove(self) -> None:
        """Kill whatever still runs in the namespaces, then delete them (their veth ends go with them)."""
        for namespace in self.namespaces:
            _remove_namespace(namespace)


def _remove_namespace(namespace: str) -> None:
    pids = _ip("netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "delete", namespace, check=False)


def remove_stale_namespaces() -> None:
    """Namespaces of an earlier run of this script whose process is gone (it was SIGKILLed)."""
    listed = _ip("netns", "list", check=False).stdout
    for name in re.findall(rf"^({PREFIX}(\d+)n[01])\b", listed, re.MULTILINE):
        namespace, pid = name
        if not Path(f"/proc/{pid}").exists():
            _remove_namespace(namespace)


def check_namespaces_allowed() -> None:
    """Raise :class:`LinkUnavailable` naming why, when this process may not make network namespaces."""
    if sys.platform != "linux":
        raise LinkUnavailable(f"network namespaces are Linux only (this is {sys.platform}).")
    probe = f"{PREFIX}{os.getpid()}probe"
    try:
        result = _ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        raise LinkUnavailable("the `ip` command (iproute2) is not installed.") from None
    _ip("netns", "delete", probe, check=False)
    if result.returncode != 0:
        raise LinkUnavailable(
            f"`ip netns add` is not permitted here ({result.stderr.strip() or 'exit code ' + str(result.returncode)});"
            " run as root (CAP_NET_ADMIN and CAP_SYS_ADMIN)."
        )
    if subprocess.run(["tc", "-V"], capture_output=True).returncode != 0:
        raise LinkUnavailable("the `tc` command (iproute2) is not usable.")


# ------------------------------------------------------------------------------------- one rank, in its namespace


def worker(args: argparse.Namespace) -> None:
    """One node of the two-machine job; rank 0 writes the run's round records and the fit's seconds to ``--out``."""
    import torch
    from common import TIMING_ONLY
    from lightning import Trainer
    from pretrain_tiny import FINETUNE_KINDS

    from lightning_parablock import CausalLMModule, FederatedBlockStrategy, ParaBlockCallback, SimulatedLink
    from lightning_parablock.data import SyntheticArithmeticDataModule

    torch.set_num_threads(1)
    callback = ParaBlockCallback(staleness=args.staleness, link=SimulatedLink(), comm_timeout="300s")
    trainer = Trainer(
        strategy=FederatedBlockStrategy(num_clients=2, local_steps=args.local_steps, seed=0),
        callbacks=[callback],
        max_epochs=args.rounds,
        accelerator="cpu",
        devices=1,
        num_nodes=2,
        default_root_dir=args.run_dir,
        **TIMING_ONLY,
    )
    module = CausalLMModule(model_name_or_path=args.checkpoint, learning_rate=1e-3, seed=0)
    data = SyntheticArithmeticDataModule(
        num_examples=2000, val_examples=0, batch_size=args.batch_size, partition="iid", seed=0, kinds=FINETUNE_KINDS
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    if trainer.is_global_zero:
        records = [asdict(r) for r in callback.records]
        Path(args.out).write_text(json.dumps({"fit_seconds": seconds, "records": records}))


def sampler(args: argparse.Namespace) -> None:
    """Write ``time tx_bytes`` of ``--sample_link`` every 20 ms until killed (runs inside the namespace)."""
    counter = Path(f"/sys/class/net/{args.sample_link}/statistics/tx_bytes")
    with open(args.out, "w") as out:
        while True:
            out.write(f"{time.monotonic():.4f} {counter.read_text().strip()}\n")
            out.flush()
            time.sleep(SAMPLE_S)


# ------------------------------------------------------------------------------------------------- one launch


@dataclass
class Run:
    """One method at one rate: what the timeline and the link's counters say."""

    method: str
    staleness: int
    rate_mb_s: float
    records: list[dict] = field(default_factory=list)
    fit_seconds: float = 0.0
    link_bytes: list[int] = field(default_factory=list)  # per rank: bytes its end sent during the run
    peak_mb_s: list[float] = field(default_factory=list)  # per rank: highest throughput over 0.5 s windows


def launch(link: NamespaceLink, run: Run, options: argparse.Namespace, folder: Path, port: int) -> Run:
    """Both ranks of one run, each in its namespace, with a sampler beside each; every process killed afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "records.json"
    samples = [folder / f"link{rank}.txt" for rank in (0, 1)]
    processes: list[subprocess.Popen] = []
    try:
        for rank in (0, 1):
            command = [sys.executable, str(HERE), "--sample_link", link.interfaces[rank], "--out", str(samples[rank])]
            processes.append(link.start(rank, command, dict(os.environ), folder / f"sampler{rank}.log"))
        time.sleep(0.5)  # the samplers' first reading comes before any traffic
        workers = []
        for rank in (0, 1):
            command = worker_command(run, options, out, folder / f"rank{rank}")
            workers.append(link.start(rank, command, node_environment(link, rank, port), folder / f"rank{rank}.log"))
        processes.extend(workers)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for rank, process in enumerate(workers):
            log = folder / f"rank{rank}.log"
            try:
                code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                where = f"{run.method} at {run.rate_mb_s:g} MB/s"
                raise RuntimeError(f"{where}: rank {rank} ran past {RUN_TIMEOUT_S:.0f} s; its log: {log}") from None
            if code != 0:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{run.method} at {run.rate_mb_s:g} MB/s: rank {rank} exited with {code}:\n{tail}")
    finally:
        for process in processes:
            _kill_group(process)
    result = json.loads(out.read_text())
    run.records, run.fit_seconds = result["records"], result["fit_seconds"]
    for path in samples:
        times, counts = read_samples(path)
        run.link_bytes.append(counts[-1] - counts[0])
        run.peak_mb_s.append(peak_throughput(times, counts, PEAK_WINDOW_S) / 1e6)
    return run


def node_environment(link: NamespaceLink, rank: int, port: int) -> dict[str, str]:
    """What one machine of a two-machine job is started with: Lightning's cluster variables, the link for gloo."""
    env = {
        **os.environ,
        "MASTER_ADDR": ADDRESSES[0],
        "MASTER_PORT": str(port),
        "NODE_RANK": str(rank),
        "WORLD_SIZE": "2",
        "GLOO_SOCKET_IFNAME": link.interfaces[rank],
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("LOCAL_RANK", None)  # started by hand: Lightning's launcher sets the rest
    return env


def worker_command(run: Run, options: argparse.Namespace, out: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable, str(HERE), "--worker", "--out", str(out), "--checkpoint", str(options.checkpoint),
        "--staleness", str(run.staleness), "--rounds", str(options.rounds), "--local_steps", str(options.local_steps),
        "--batch_size", str(options.batch_size), "--run_dir", str(run_dir),
    ]  # fmt: skip


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def read_samples(path: Path) -> tuple[list[float], list[int]]:
    rows = [line.split() for line in path.read_text().splitlines() if len(line.split()) == 2]
    return [float(t) for t, _ in rows], [int(b) for _, b in rows]


def peak_throughput(times: list[float], counts: list[int], window_s: float) -> float:
    """The most bytes per second over any span of at least ``window_s`` between two samples."""
    best, start = 0.0, 0
    for end in range(len(times)):
        while start + 1 < end and times[end] - times[start + 1] >= window_s:
            start += 1
        if times[end] - times[start] >= window_s:
            best = max(best, (counts[end] - counts[start]) / (times[end] - times[start]))
    return best


# ---------------------------------------------------------------------------------------------------- figures


@dataclass
class RateFigures:
    """ParaBlock and FedBCD at one rate: measured, modelled at R, predicted (modelled at 2R); per-round means over
    rounds 1.. (round 0 warms up, and ParaBlock exchanges nothing in it)."""

    rate_mb_s: float
    measured: dict[str, float]
    modelled: dict[str, float]
    predicted: dict[str, float]
    compute: dict[str, float]  # the slowest rank's compute
    exchange: dict[str, float]  # measured on the comm thread (host work and collectives), from the last rank's arrival
    wait: dict[str, float]  # the timeline's exposed wait: the longest any rank was blocked at the boundary
    lengthened: dict[str, float]  # the wait on the round's critical path: max_k (compute_k + wait_k) - max_k compute_k
    block_mb: float

    def ratio(self, kind: str) -> float:
        figures = getattr(self, kind)
        return figures["ParaBlock"] / figures["FedBCD"]


def figures_of(rate_mb_s: float, runs: dict[str, Run]) -> RateFigures:
    from lightning_parablock import SimulatedLink
    from lightning_parablock.telemetry.timeline import modelled_wallclock, record_from_json

    measured, modelled, predicted, compute, exchange, wait, lengthened = {}, {}, {}, {}, {}, {}, {}
    block_mb = 0.0
    for name, run in runs.items():
        records = [record_from_json(r) for r in run.records]
        rounds = [r for r in records if not r.flush][1:]
        exchanges = [r for r in records if r.exchanged_round is not None]
        measured[name] = sum(r.wall_seconds for r in records)
        modelled[name] = modelled_wallclock(records, SimulatedLink(rate_mb_s * 1e6), run.staleness)
        predicted[name] = modelled_wallclock(records, SimulatedLink(2 * rate_mb_s * 1e6), run.staleness)
        compute[name] = _mean(r.process_compute_seconds for r in rounds)
        exchange[name] = _mean(_exchange_seconds(r) for r in exchanges)
        wait[name] = _mean(r.exposed_wait_seconds for r in rounds)
        lengthened[name] = _mean(_critical_wait(r.ranks) for r in rounds)
        block_mb = max(max(r.upload_bytes.values()) for r in exchanges) / 1e6
    return RateFigures(rate_mb_s, measured, modelled, predicted, compute, exchange, wait, lengthened, block_mb)


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def _exchange_seconds(record: Any) -> float:
    """One exchange on the comm thread, from the last rank's arrival: the least any rank spent in it."""
    if not record.ranks:  # the final flush: this rank's own record
        return record.comm_work_seconds
    return min(rank["comm_work_seconds"] for rank in record.ranks.values())


def _critical_wait(ranks: dict[int, dict[str, float]]) -> float:
    """How much longer the boundary's waiting made the round than its slowest rank's compute."""
    ends = [rank["compute_seconds"] + rank["exposed_wait_seconds"] for rank in ranks.values()]
    return max(ends) - max(rank["compute_seconds"] for rank in ranks.values())


def format_table(figures: list[RateFigures], runs: dict[float, dict[str, Run]]) -> str:
    lines = [
        f"{'MB/s':>6} {'method':>9} {'measured':>9} {'model@R':>8} {'model@2R':>9} {'compute':>8} {'exchange':>9}"
        f" {'wait':>7} {'critical':>9} {'link MB':>9} {'peak MB/s':>11}",
        "-" * 102,
    ]
    for rate in figures:
        for name, _ in METHODS:
            run = runs[rate.rate_mb_s][name]
            lines.append(
                f"{rate.rate_mb_s:6g} {name:>9} {rate.measured[name]:8.2f}s {rate.modelled[name]:7.2f}s"
                f" {rate.predicted[name]:8.2f}s {rate.compute[name]:7.3f}s {rate.exchange[name]:8.3f}s"
                f" {rate.wait[name]:6.3f}s {rate.lengthened[name]:8.3f}s"
                f" {'/'.join(f'{b / 1e6:.1f}' for b in run.link_bytes):>9}"
                f" {'/'.join(f'{p:.2f}' for p in run.peak_mb_s):>11}"
            )
    lines += ["", f"{'MB/s':>6} {'exchange/compute':>17} {'ParaBlock/FedBCD':>17} {'model@R':>8} {'model@2R':>9}"
                  f" {'|diff|':>7} {'critical wait/compute':>22}", "-" * 92]  # fmt: skip
    for rate in figures:
        difference = abs(rate.ratio("measured") - rate.ratio("predicted"))
        lines.append(
            f"{rate.rate_mb_s:6g} {_load(rate):17.2f} {rate.ratio('measured'):17.3f}"
            f" {rate.ratio('modelled'):8.3f} {rate.ratio('predicted'):9.3f} {difference:7.3f}"
            f" {rate.lengthened['ParaBlock'] / rate.compute['ParaBlock']:21.1%}"
        )
    return "\n".join(lines)


def _load(rate: RateFigures) -> float:
    """One exchange against one round's compute, as ParaBlock's run measured them."""
    return rate.exchange["ParaBlock"] / rate.compute["ParaBlock"]


def check_targets(figures: list[RateFigures]) -> list[str]:
    """The issue's targets against the prediction for this link; one line each, PASS or FAIL."""
    lines = []
    for rate in figures:
        difference = abs(rate.ratio("measured") - rate.ratio("predicted"))
        verdict = "PASS" if difference <= 0.05 else "FAIL"
        lines.append(
            f"{verdict} {rate.rate_mb_s:g} MB/s: |measured - predicted ratio| = {difference:.3f} (target <= 0.05)"
        )
        if _load(rate) < 1:
            share = rate.lengthened["ParaBlock"] / rate.compute["ParaBlock"]
            verdict = "PASS" if share <= 0.05 else "FAIL"
            lines.append(
                f"{verdict} {rate.rate_mb_s:g} MB/s: one exchange is {_load(rate):.2f} of a round's compute;"
                f" ParaBlock's wait on the critical path is {share:.1%} of it (target <= 5%)"
            )
    return lines


def plot(figures: list[RateFigures], path: Path, title: str) -> None:
    """The paper's Figure 2 shape: whole-run seconds against the link's rate (left), ParaBlock / FedBCD (right)."""
    from matplotlib.figure import Figure

    rates = [f.rate_mb_s for f in figures]
    figure = Figure(figsize=(11, 4.2))
    seconds, ratio = figure.subplots(1, 2)
    for (name, _), colour in zip(METHODS, ("tab:blue", "tab:red")):
        seconds.plot(rates, [f.measured[name] for f in figures], "o-", color=colour, label=f"{name}, measured")
        seconds.plot(rates, [f.predicted[name] for f in figures], "s--", color=colour, alpha=0.6,
                     label=f"{name}, modelled (link at 2R)")  # fmt: skip
    seconds.set_xscale("log")
    seconds.set_xlabel("link rate R per direction (MB/s)")
    seconds.set_ylabel("whole run, seconds (rounds and flush)")
    seconds.set_ylim(bottom=0)
    seconds.legend(fontsize=8)
    ratio.plot(rates, [f.ratio("measured") for f in figures], "o-", label="measured over the shaped link")
    for kind, style, label in (
        ("predicted", "s--", "modelled, link at 2R (2 peers, full duplex)"),
        ("modelled", "^:", "modelled, link at R (upload, then download)"),
    ):
        ratio.plot(rates, [f.ratio(kind) for f in figures], style, label=label)
    ratio.set_xscale("log")
    ratio.set_xlabel("link rate R per direction (MB/s)")
    ratio.set_ylabel("ParaBlock / FedBCD wall-clock")
    highest = max(f.ratio(kind) for f in figures for kind in ("measured", "modelled", "predicted"))
    ratio.set_ylim(0.4, max(1.05, highest + 0.05))
    ratio.axhline(0.5, color="grey", linewidth=0.5)
    ratio.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------------- main


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(f"real_link: stopped by signal {signum}; removing the namespaces")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1,2,5,20,100", help="link rates in MB/s per direction, comma-separated")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local_steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="one rate (5 MB/s), 4 rounds, 3 local steps")
    parser.add_argument("--out", type=Path, default=Path("runs/real_link"), help="logs, records and the summary")
    parser.add_argument("--plot", type=Path, default=None, help="the figure (default: <out>/real_link.png)")
    parser.add_argument("--cache", type=Path, default=None, help="where pretrain_tiny.py keeps its checkpoints")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sample_link", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--staleness", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--run_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sample_link:
        sampler(args)
        return
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.rates, args.rounds, args.local_steps = "5", 4, 3
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not rates or min(rates) <= 0:
        parser.error(f"--rates must be positive MB/s values, comma-separated, got {args.rates!r}")
    try:
        check_namespaces_allowed()
    except LinkUnavailable as why:
        print(f"{SKIPPED} {why}", flush=True)
        return

    from pretrain_tiny import CACHE, QUICK, PretrainSettings, pretrained_checkpoint

    args.checkpoint = pretrained_checkpoint(QUICK if args.quick else PretrainSettings(), args.cache or CACHE)
    command = "python benchmarks/real_link.py " + " ".join(sys.argv[1:])
    print(f"command: {command}\ncheckpoint: {args.checkpoint.name}", flush=True)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    runs: dict[float, dict[str, Run]] = {}
    with NamespaceLink() as link:
        port = 29500
        for rate in rates:
            link.shape(rate * 1e6)
            runs[rate] = {}
            for name, staleness in METHODS:
                port += 1  # a fresh port per run: the last run's sockets may linger in TIME_WAIT
                folder = args.out / f"{rate:g}MBps_{name}"
                run = launch(link, Run(name, staleness, rate), args, folder, port)
                runs[rate][name] = run
                print(f"{name} at {rate:g} MB/s: {sum(r['wall_seconds'] for r in run.records):.2f} s measured,"
                      f" link peak {'/'.join(f'{p:.2f}' for p in run.peak_mb_s)} MB/s", flush=True)  # fmt: skip
    figures = [figures_of(rate, runs[rate]) for rate in rates]
    table = format_table(figures, runs)
    print("\n" + table + "\n")
    print("\n".join(check_targets(figures)))
    summary = {
        "command": command,
        "rates": [asdict(f) for f in figures],
        "runs": {
            f"{rate:g}": {name: {k: v for k, v in asdict(run).items() if k != "records"} for name, run in by.items()}
            for rate, by in runs.items()
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_link.json").write_text(json.dumps(summary, indent=1))
    figure_path = args.plot or args.out / "real_link.png"
    title = (
        f"2 nodes (network namespaces) over a tbf-shaped veth link, one client each: {args.rounds} rounds of"
        f" {args.local_steps} local steps, fp32 block {figures[0].block_mb:.2f} MB"
    )
    plot(figures, figure_path, title)
    print(f"\nfigure: {figure_path}\nsummary: {args.out / 'real_link.json'}")


if __name__ == "__main__":
    main()
