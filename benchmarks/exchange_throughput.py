"""The communication thread's host cost at the paper's block sizes, beside what this machine's memory allows.

A ParaBlock block of Llama 3-8B is 2 decoder layers: 436 M parameters, 0.87 GB in bf16 and 1.75 GB as the fp32
delta every client sends. Each exchange runs on one host thread: the deltas' host copies (on a GPU; a CPU delta is
already on the host), the non-finite check, the weighted sum and the transport. This benchmark runs that path
for real on such a block, with 1, 2 and 4 clients per process, each delta on the wire either as the fp32 it is
(``compression="none"``, the default) or through the bf16 codec (``compression="bf16"``, 0.87 GB), with the
paper's weighted mean (``MeanAggregator``):

- in memory: every client in this process, ``InMemoryTransport`` on a real ``CommWorker`` (its thread, submit,
  wait);
- torch.distributed: two processes on this machine, each hosting that many clients, the transport ``ByProcesses``
  builds for several processes on a real ``CommWorker`` (the exchange group, the status all-reduce, the partial
  sums and their all-reduce): the default, which adds up the partial sums in shared memory (``2 proc shm``), and
  ``ByProcesses(shared_memory=False)``, gloo's all-reduce over loopback TCP (``2 proc gloo``).

Per path it prints the seconds of a whole round (submit to the aggregate in hand, then released as the round
boundary releases it once applied: median of the repeats, the first round included), wall clock and CPU seconds of
the process, the first round's CPU seconds apart (what a run pays once: its memory made and touched), and, per
stage, the library's own function on the same data, timed alone on one thread: the mean's one pass that adds a
delta as sent (fp32, or bf16 read into the fp32 sum without a decoded copy) into the sum and checks it for NaN/Inf,
into a new sum (its pages touched for the first time: what every round paid before sums were made in released
memory, ``MeanAggregator.accumulate``), over a released sum's memory (the round's first client:
``MeanAggregator.sum_into``, no zeroing pass) and into a sum already made (each further client); and the path's
all-reduce of the sum (``SharedMemorySum`` or gloo's). GB/s are gigabytes of fp32 delta per CPU second (1e9 bytes;
on a loaded machine the wall clock also counts waiting for a core), set beside this machine's single-thread memcpy
(``dst.copy_(src)``), sum (``a.add_(b)``) and read (``aminmax``) over buffers of the block's size, measured in the
same run.

Memory: per process, every hosted upload and two sums. A configuration is run only when the memory the kernel
reports available (``MemAvailable``), and for shared memory the space free in ``/dev/shm``, covers its need plus
a margin; otherwise it is listed as skipped, with the need.

    python benchmarks/exchange_throughput.py [--quick] [--clients 1,2,4] [--repeats 3] [--wire fp32,bf16]
        [--paths memory,shared,gloo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

HERE = Path(__file__).resolve()
GB = 1e9
MARGIN_GB = 1.5  # beyond a configuration's tensors: the processes themselves, and other jobs' growth
PROCESS_GB = 0.4  # one Python process with torch and the library imported


@dataclass(frozen=True)
class BlockShape:
    """A ParaBlock block of ``layers`` Llama decoder layers."""

    hidden: int
    intermediate: int
    kv: int  # key/value projection width (grouped-query attention)
    layers: int = 2

    def layout(self) -> list[tuple[str, torch.Size]]:
        h, i, kv = self.hidden, self.intermediate, self.kv
        one = [
            ("self_attn.q_proj.weight", (h, h)), ("self_attn.k_proj.weight", (kv, h)),
            ("self_attn.v_proj.weight", (kv, h)), ("self_attn.o_proj.weight", (h, h)),
            ("mlp.gate_proj.weight", (i, h)), ("mlp.up_proj.weight", (i, h)), ("mlp.down_proj.weight", (h, i)),
            ("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,)),
        ]  # fmt: skip
        return [(f"layers.{layer}.{name}", torch.Size(shape)) for layer in range(self.layers) for name, shape in one]

    @property
    def numel(self) -> int:
        return sum(shape.numel() for _, shape in self.layout())


LLAMA3_8B = BlockShape(hidden=4096, intermediate=14336, kv=1024)  # 436 M parameters: 1.745 GB fp32, 0.872 GB bf16
QUICK = BlockShape(hidden=1024, intermediate=3584, kv=256)  # 27 M parameters: 0.109 GB fp32
PATH_NAMES = {"memory": "in memory", "shared": "2 proc shm", "gloo": "2 proc gloo"}


# ------------------------------------------------------------------------------------------------------ timing


@dataclass(frozen=True)
class Timing:
    """Median seconds of some calls: wall clock, and CPU time of this process (every thread: gloo's too); and the
    first call's CPU time (what is paid once: new memory, first touches).

    On a loaded machine the wall clock also counts time spent waiting for a core; the CPU seconds do not.
    """

    wall: float
    cpu: float
    first_cpu: float = 0.0


def timed(function: Callable[[], Any], repeats: int, before: Callable[[], Any] = lambda: None) -> Timing:
    """``function()`` ``repeats`` times, its result dropped before the next call and ``before()`` untimed ahead of
    each."""
    walls, cpus = [], []
    for _ in range(repeats):
        before()
        started, cpu = time.perf_counter(), time.process_time()
        result = function()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
        del result
    return Timing(statistics.median(walls), statistics.median(cpus), cpus[0])


def machine_bandwidth(numel: int, repeats: int) -> dict[str, float]:
    """Single-thread memcpy, sum and read over fp32 buffers of ``numel`` values (already touched): GB of one buffer
    per CPU second."""
    torch.set_num_threads(1)
    a, b = torch.rand(numel), torch.rand(numel)
    operations = {
        "memcpy": lambda: a.copy_(b),
        "sum": lambda: a.add_(b, alpha=0.5),
        "read (aminmax)": lambda: torch.aminmax(b),
    }
    return {name: numel * 4 / timed(operation, repeats).cpu / GB for name, operation in operations.items()}


def make_delta(layout: list[tuple[str, torch.Size]], wire: str, seed: int) -> dict[str, Any]:
    """One client's upload as the comm thread receives it: fp32 tensors, or the bf16 codec's encoded tensors."""
    from lightning_parablock.comm.codecs import BF16Codec, EncodedTensor

    generator = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if wire == "bf16" else torch.float32
    delta = {}
    for name, shape in layout:
        values = torch.empty(shape, dtype=dtype).uniform_(-1e-3, 1e-3, generator=generator)
        delta[name] = EncodedTensor(BF16Codec(), shape, {"values": values}) if wire == "bf16" else values
    return delta


# ---------------------------------------------------------------------------------------------------- the paths


@dataclass
class PathResult:
    path: str  # "in memory", "2 proc shm" or "2 proc gloo"
    wire: str
    clients: int  # per process
    round: Optional[Timing] = None  # submit to the aggregate in hand, the main thread idle
    stages: dict[str, Timing] = field(default_factory=dict)  # per client, except the all-reduce (per round)
    skipped: Optional[str] = None


def stage_times(delta: dict[str, Any], layout: list[tuple[str, torch.Size]], repeats: int) -> dict[str, Timing]:
    """The per-client stages of the path, each the library's own function, alone on one thread: the mean's one pass
    that adds a delta as the transport reads it (``summands_of``: fp32, or bf16 with no decoded copy) into the sum and
    checks it for NaN/Inf, into a new sum (its memory touched for the first time: ``accumulate`` into zeros), over a
    released sum's memory (the round's first client, written over it: ``sum_into``) and into a sum already made
    (each further client: ``accumulate``)."""
    from lightning_parablock import MeanAggregator
    from lightning_parablock.comm.codecs import as_encoded, summands_of
    from lightning_parablock.comm.transport import views_by_layout

    torch.set_num_threads(1)
    summands = {0: summands_of(as_encoded(delta))}
    numel = sum(shape.numel() for _, shape in layout)
    aggregator = MeanAggregator()

    def into_a_new_sum() -> Any:
        total = torch.zeros(numel, dtype=torch.float32)
        aggregator.accumulate(views_by_layout(total, layout), summands, {0: 0.5})
        return total

    stages = {"new sum": timed(into_a_new_sum, repeats)}
    total = views_by_layout(into_a_new_sum(), layout)
    stages["write"] = timed(lambda: aggregator.sum_into(total, summands, {0: 0.5}), repeats)
    stages["sum"] = timed(lambda: aggregator.accumulate(total, summands, {0: 0.5}), repeats)
    return stages


def in_memory(shape: BlockShape, wire: str, clients: int, repeats: int) -> PathResult:
    """Every client in this process: the in-memory transport on a real CommWorker."""
    from lightning_parablock import MeanAggregator, SimulatedLink
    from lightning_parablock.comm.in_memory import InMemoryTransport
    from lightning_parablock.comm.worker import CommWorker

    layout = shape.layout()
    deltas = {client: make_delta(layout, wire, client) for client in range(clients)}
    result = PathResult("in memory", wire, clients, stages=stage_times(deltas[0], layout, repeats))
    worker = CommWorker(InMemoryTransport(MeanAggregator(), SimulatedLink()), timeout_s=3600.0)
    try:
        result.round = timed(round_of(worker, deltas), repeats)
    finally:
        worker.shutdown()
    return result


def round_of(worker: Any, deltas: dict[int, Any]) -> Callable[[], Any]:
    """One whole exchange through ``worker`` per call: submit, wait for the aggregate, release it (the boundary
    does once it has applied it)."""
    from lightning_parablock.comm.transport import RoundUploads

    rounds = iter(range(1_000_000))
    weights = {client: 1.0 for client in deltas}

    def one_round() -> Any:
        round_index = next(rounds)
        worker.submit(RoundUploads(round_index, 0, deltas, weights))
        result = worker.wait(round_index)
        result.release_aggregate()
        return result

    return one_round


def rank_main(args: argparse.Namespace) -> None:
    """One of the two processes: its clients' stages, the path's all-reduce alone, then whole rounds through the
    real worker and the transport ``ByProcesses`` builds for several processes."""
    import torch.distributed as dist

    from lightning_parablock import ByProcesses, MeanAggregator, SimulatedLink
    from lightning_parablock.comm.transport import ExchangeContext
    from lightning_parablock.comm.worker import CommWorker

    torch.set_num_threads(1)
    shape = BlockShape(**json.loads(args.shape))
    layout = shape.layout()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=2)
    n = args.clients
    placement = [client // n for client in range(2 * n)]
    deltas = {c: make_delta(layout, args.wire, c) for c in range(2 * n) if placement[c] == args.rank}
    stages = stage_times(next(iter(deltas.values())), layout, args.repeats)
    shared_memory = args.path == "shared"
    result = PathResult(PATH_NAMES[args.path], args.wire, n, stages=stages)
    result.stages["all-reduce"] = all_reduce_alone([s.numel() for _, s in layout], shared_memory, args.repeats)
    context = ExchangeContext(
        aggregator=MeanAggregator(), link=SimulatedLink(), timeout_s=3600.0, placement=placement, member=args.rank,
        members=2, block_layout=lambda block: layout, device=torch.device("cpu"),
    )  # fmt: skip
    worker = CommWorker(ByProcesses(shared_memory=shared_memory).build(context), timeout_s=3600.0)
    try:
        result.round = timed(round_of(worker, deltas), args.repeats, dist.barrier)
    finally:
        worker.shutdown()
    dist.barrier()
    if args.rank == 0:
        Path(args.out).write_text(json.dumps(asdict(result)))
    dist.destroy_process_group()


def all_reduce_alone(sizes: list[int], shared_memory: bool, repeats: int) -> Timing:
    """The all-reduce of a sum of tensors of ``sizes`` fp32 values between the two processes, on a group of its own:
    in shared memory (partials already written, as a round's sum leaves them) or gloo's."""
    import torch.distributed as dist

    from lightning_parablock.comm.shared_memory import SharedMemorySum

    group = dist.new_group(backend="gloo")
    if not shared_memory:
        partial = torch.zeros(sum(sizes), dtype=torch.float32)
        return timed(lambda: dist.all_reduce(partial, group=group), repeats, dist.barrier)
    shared = SharedMemorySum.between(group)
    assert shared is not None, "two processes of one machine share /dev/shm"
    agree = lambda values: dist.all_reduce(values, group=group)  # noqa: E731

    def all_reduce() -> None:
        shared.partial(sizes, agree)
        shared.all_reduce(agree)[1]()  # handed back, as the round boundary does

    all_reduce()  # its memory made and touched, as in every round after the first
    return timed(all_reduce, repeats, dist.barrier)


def two_processes(shape: BlockShape, path: str, wire: str, clients: int, repeats: int) -> PathResult:
    """Both ranks as two processes of this script; each in a session of its own, killed if still there after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        processes = [
            subprocess.Popen(
                [sys.executable, str(HERE), "--rank", str(rank), "--port", str(port), "--out", str(out),
                 "--shape", json.dumps(asdict(shape)), "--wire", wire, "--clients", str(clients),
                 "--repeats", str(repeats), "--path", path],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            )
            for rank in (0, 1)
        ]  # fmt: skip
        try:
            outputs = [process.communicate(timeout=1800)[0].decode(errors="replace") for process in processes]
        finally:
            for process in processes:
                try:
                    os.killpg(process.pid, 9)
                except ProcessLookupError:
                    pass
        for rank, (process, output) in enumerate(zip(processes, outputs)):
            if process.returncode != 0:
                raise RuntimeError(f"rank {rank} exited with {process.returncode}:\n{output[-3000:]}")
        return path_result(json.loads(out.read_text()))


def path_result(data: dict[str, Any]) -> PathResult:
    """A :class:`PathResult` from its JSON."""
    data["round"] = Timing(**data["round"]) if data.get("round") else None
    data["stages"] = {stage: Timing(**timing) for stage, timing in data.get("stages", {}).items()}
    return PathResult(**data)


# ------------------------------------------------------------------------------------------------------ memory


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.machine()


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GB
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def need_gb(path: str, wire: str, clients: int, block_gb: float) -> float:
    """Peak memory of a configuration: the uploads and two sums (the stages' new and touched ones; the round's one
    and the transport's reused one, in /dev/shm or not), per process."""
    upload = block_gb / 2 if wire == "bf16" else block_gb
    per_process = clients * upload + 2 * block_gb + PROCESS_GB
    return per_process if path == "memory" else 2 * per_process


# ------------------------------------------------------------------------------------------------------- report


def format_report(results: list[PathResult], block_gb: float, reference: dict[str, float]) -> str:
    """Per configuration: each stage's GB of fp32 delta per CPU second; the round's wall and CPU seconds and the
    clients' GB per CPU second of the whole round, against single-thread memcpy; the first round's CPU seconds."""
    memcpy = reference["memcpy"]
    columns = (("new sum", 7), ("write", 6), ("sum", 6), ("all-reduce", 10))
    lines = [
        f"{'path':>11} {'wire':>4} {'clients':>7} | " + " ".join(f"{name:>{width}}" for name, width in columns)
        + f" | {'round s':>7} {'CPU s':>6} {'GB/CPU s':>8} {'of memcpy':>9} {'1st CPU s':>9}",
        f"{'':>11} {'':>4} {'/proc':>7} | {'GB/s per CPU second, alone':^32} |",
        "-" * 108,
    ]  # fmt: skip
    for r in results:
        head = f"{r.path:>11} {r.wire:>4} {r.clients:>7}"
        if r.skipped:
            lines.append(f"{head} | skipped: {r.skipped}")
            continue
        cells = [
            f"{block_gb / r.stages[stage].cpu:{width}.2f}" if stage in r.stages else f"{'-':>{width}}"
            for stage, width in columns
        ]
        rate = r.clients * block_gb / r.round.cpu
        lines.append(
            f"{head} | {' '.join(cells)} | {r.round.wall:7.2f} {r.round.cpu:6.2f} {rate:8.2f} {rate / memcpy:9.0%}"
            f" {r.round.first_cpu:9.2f}"
        )
    return "\n".join(lines)


def run_configuration(shape: BlockShape, path: str, wire: str, clients: int, repeats: int) -> PathResult:
    """One path, wire format and number of clients; skipped when the memory available does not cover it."""
    block_gb = shape.numel * 4 / GB
    need, have = need_gb(path, wire, clients, block_gb), available_gb()
    if need + MARGIN_GB > have:
        why = f"needs {need:.1f} GB + {MARGIN_GB} GB margin, {have:.1f} GB available"
        return PathResult(PATH_NAMES[path], wire, clients, skipped=why)
    from lightning_parablock.comm.shared_memory import SHARED_DIRECTORY

    shared_free = shutil.disk_usage(SHARED_DIRECTORY).free / GB if SHARED_DIRECTORY.is_dir() else 0.0
    if path == "shared" and 2 * block_gb > shared_free:  # one partial per process
        why = f"needs {2 * block_gb:.1f} GB in {SHARED_DIRECTORY}, {shared_free:.1f} GB free"
        return PathResult(PATH_NAMES[path], wire, clients, skipped=why)
    if path == "memory":
        return in_memory(shape, wire, clients, repeats)
    return two_processes(shape, path, wire, clients, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 0.11 GB block (27 M parameters) instead of 1.75 GB")
    parser.add_argument("--clients", default="1,2,4", help="clients per process, comma-separated")
    parser.add_argument("--wire", default="fp32,bf16", help="fp32 (no compression) and/or bf16 (the bf16 codec)")
    parser.add_argument(
        "--paths", default="memory,shared,gloo", help="in memory; 2 processes summing in shared memory; or by gloo"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    for hidden in ("--rank", "--port", "--out", "--shape", "--path"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        args.rank, args.clients, args.repeats = int(args.rank), int(args.clients), int(args.repeats)
        rank_main(args)
        return
    clients = [int(c) for c in args.clients.split(",")]
    wires = [w.strip() for w in args.wire.split(",")]
    paths = [p.strip() for p in args.paths.split(",")]
    for value, allowed, name in ((wires, {"fp32", "bf16"}, "--wire"), (paths, set(PATH_NAMES), "--paths")):
        if not value or not set(value) <= allowed:
            parser.error(f"{name} takes a comma-separated list from {sorted(allowed)}, got {','.join(value)!r}")
    if not clients or min(clients) < 1:
        parser.error(f"--clients takes positive integers, got {args.clients!r}")
    shape = QUICK if args.quick else LLAMA3_8B
    block_gb = shape.numel * 4 / GB

    command = "python benchmarks/exchange_throughput.py " + " ".join(sys.argv[1:])
    print(f"command: {command}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__};"
          f" load average {os.getloadavg()[0]:.1f}; {available_gb():.1f} GB available")  # fmt: skip
    print(
        f"block: {shape.layers} layers (hidden {shape.hidden}, intermediate {shape.intermediate}, kv {shape.kv}),"
        f" {shape.numel / 1e6:.0f} M parameters: {block_gb:.3f} GB fp32, {block_gb / 2:.3f} GB bf16",
        flush=True,
    )
    reference = machine_bandwidth(shape.numel, args.repeats)
    print("this machine, one thread, fp32 buffers of the block's size, GB per CPU second: "
          + ", ".join(f"{name} {rate:.2f} GB/s" for name, rate in reference.items()), flush=True)  # fmt: skip

    results = []
    for wire in wires:
        for path in paths:
            for n in clients:
                results.append(run_configuration(shape, path, wire, n, args.repeats))
                print(format_report(results[-1:], block_gb, reference).splitlines()[-1], flush=True)
    print()
    print(format_report(results, block_gb, reference))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        summary = {"command": command, "block_gb": block_gb, "reference": reference}
        args.json.write_text(json.dumps({**summary, "results": [asdict(r) for r in results]}, indent=1))


if __name__ == "__main__":
    main()
