"""The simulated link, one exchange, and the background thread that overlaps it with compute."""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import threading
import time
import weakref

import pytest
import torch

from lightning_parablock.aggregation import MeanAggregator
from lightning_parablock.aggregation.nonfinite import NonFiniteDeltaError
from lightning_parablock.comm.in_memory import InMemoryTransport
from lightning_parablock.comm.link import SimulatedLink, parse_bandwidth, parse_duration
from lightning_parablock.comm.transport import CommunicationError, ExchangeResult, RoundUploads
from lightning_parablock.comm.worker import CommWorker

# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "value, bytes_per_second",
    [
        ("100MB/s", 1e8),
        ("100 MB / s", 1e8),
        ("100MBps", 1e8),
        ("1.5kB/s", 1500.0),
        ("1GiB/s", 2**30),
        ("2MiB/s", 2 * 2**20),
        ("1KiB/s", 1024.0),
        ("800Mbit/s", 1e8),
        ("800Mbps", 1e8),  # lower-case b: bits
        ("800Mb/s", 1e8),
        ("1Gbit/s", 1.25e8),
        ("8bps", 1.0),
        ("1e3B/s", 1000.0),
        (1e8, 1e8),
        (1000, 1000.0),
        (0.5, 0.5),
    ],
)
def test_parse_bandwidth(value, bytes_per_second):
    assert parse_bandwidth(value) == pytest.approx(bytes_per_second)


@pytest.mark.parametrize("value", ["fast", "100MB", "-5MB/s", "MB/s", "100furlongs/s", "", True])
def test_parse_bandwidth_rejects_unparseable_values_naming_them(value):
    with pytest.raises(ValueError, match=f"Could not parse bandwidth {value!r}".replace("(", r"\(").replace(")", r"\)")):
        parse_bandwidth(value)


@pytest.mark.parametrize("value", [0, 0.0, -1e6, "0MB/s", float("nan")])
def test_parse_bandwidth_rejects_non_positive_values(value):
    with pytest.raises(ValueError, match="Bandwidth must be positive, got"):
        parse_bandwidth(value)


@pytest.mark.parametrize(
    "value, seconds",
    [("20ms", 0.02), ("0.5s", 0.5), ("150us", 150e-6), ("150µs", 150e-6), ("2", 2.0), (" 3 s ", 3.0), (0, 0.0), (1.25, 1.25)],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["soon", "5min", "-1s", "ms"])
def test_parse_duration_rejects_unparseable_values_naming_them(value):
    with pytest.raises(ValueError, match=f"Could not parse duration '{value}'"):
        parse_duration(value)


def test_parse_duration_rejects_negative_numbers():
    with pytest.raises(ValueError, match="cannot be negative, got -0.5"):
        parse_duration(-0.5)


# --------------------------------------------------------------------------- the link


def test_transfer_seconds_is_latency_plus_size_over_bandwidth():
    link = SimulatedLink("1MB/s", latency="20ms")
    assert link.bytes_per_second == 1e6 and link.latency_s == pytest.approx(0.02)
    assert link.transfer_seconds(0) == pytest.approx(0.02)
    assert link.transfer_seconds(500_000) == pytest.approx(0.52)
    assert link.transfer_seconds(2_000_000) == pytest.approx(2.02)


def test_an_infinite_link_costs_only_latency():
    assert SimulatedLink().transfer_seconds(10**12) == 0.0
    assert SimulatedLink(None, latency=0.1).transfer_seconds(10**12) == pytest.approx(0.1)


def test_link_rejects_bad_settings_at_construction():
    with pytest.raises(ValueError, match="'fast'"):
        SimulatedLink("fast")
    with pytest.raises(ValueError, match="'later'"):
        SimulatedLink("1MB/s", latency="later")


def test_link_repr_shows_its_settings():
    assert repr(SimulatedLink("100MB/s", "5ms")) == "SimulatedLink(bandwidth='100MB/s', latency='5ms')"


# --------------------------------------------------------------------------- one exchange


def deltas_of(*client_values: float, numel: int = 4, dtype=torch.float32) -> dict[int, dict[str, torch.Tensor]]:
    return {
        client: {"a": torch.full((numel,), value, dtype=dtype), "b": torch.full((2, 2), 2 * value, dtype=dtype)}
        for client, value in enumerate(client_values)
    }


def exchange(round_index, block, deltas, weights, link, aggregator=None) -> ExchangeResult:
    """One in-memory exchange on this thread."""
    transport = InMemoryTransport(aggregator or MeanAggregator(), link)
    return transport.exchange(RoundUploads(round_index, block, deltas, weights), threading.Event())


def in_memory_worker(link: SimulatedLink, timeout_s: float, aggregator=None) -> CommWorker:
    return CommWorker(InMemoryTransport(aggregator or MeanAggregator(), link), timeout_s)


def test_exchange_returns_the_weighted_mean_and_counts_bytes():
    deltas = deltas_of(1.0, 4.0, 10.0)
    weights = {0: 0.5, 1: 0.25, 2: 0.25}
    result = exchange(7, 2, deltas, weights, SimulatedLink())
    assert isinstance(result, ExchangeResult) and (result.round, result.block) == (7, 2)
    expected = 0.5 * 1.0 + 0.25 * 4.0 + 0.25 * 10.0
    torch.testing.assert_close(result.aggregate["a"], torch.full((4,), expected))
    torch.testing.assert_close(result.aggregate["b"], torch.full((2, 2), 2 * expected))
    per_client = (4 + 4) * 4  # 8 fp32 values
    assert result.upload_bytes == {0: per_client, 1: per_client, 2: per_client}  # every client uploads its delta
    assert result.download_bytes == per_client  # and downloads the aggregate
    assert result.link_seconds == 0.0 and result.work_seconds >= 0.0


def test_exchange_counts_wire_bytes_in_the_delta_dtype_and_aggregates_in_fp32():
    deltas = deltas_of(1.0, 3.0, numel=10, dtype=torch.bfloat16)
    result = exchange(0, 0, deltas, {0: 0.5, 1: 0.5}, SimulatedLink())
    assert result.aggregate["a"].dtype == torch.float32
    assert sum(result.upload_bytes.values()) == 2 * (10 + 4) * 2  # bf16 on the way up
    assert result.download_bytes * 2 == 2 * (10 + 4) * 4  # the fp32 aggregate on the way down
    torch.testing.assert_close(result.aggregate["a"], torch.full((10,), 2.0))


def test_exchange_takes_at_least_the_modelled_link_time():
    # Two clients each upload 100 kB over 1 MB/s (0.1 s, in parallel), then download 100 kB (0.1 s).
    link = SimulatedLink("1MB/s")
    deltas = {c: {"w": torch.full((25_000,), float(c))} for c in range(2)}
    start = time.perf_counter()
    result = exchange(0, 0, deltas, {0: 0.5, 1: 0.5}, link)
    elapsed = time.perf_counter() - start
    assert result.link_seconds == pytest.approx(0.2)
    assert elapsed >= result.link_seconds - 1e-3
    assert elapsed < result.link_seconds + 1.0
    assert sum(result.upload_bytes.values()) == 200_000 and result.download_bytes * len(result.upload_bytes) == 200_000


def test_exchange_link_time_uses_the_slowest_upload():
    link = SimulatedLink("1MB/s", latency="10ms")
    deltas = {0: {"w": torch.zeros(1000)}, 1: {"w": torch.zeros(1000)}}
    result = exchange(0, 0, deltas, {0: 0.5, 1: 0.5}, link)
    # upload 4 kB and download 4 kB, latency each way
    assert result.link_seconds == pytest.approx(2 * (0.01 + 4000 / 1e6))


def test_exchange_result_is_its_own_and_ignores_autograd():
    delta = torch.ones(3, requires_grad=True)
    result = exchange(0, 0, {0: {"w": delta}}, {0: 1.0}, SimulatedLink())
    assert not result.aggregate["w"].requires_grad
    with torch.no_grad():
        delta.add_(100.0)
    torch.testing.assert_close(result.aggregate["w"], torch.ones(3))


# --------------------------------------------------------------------------- the worker thread


@pytest.fixture
def worker_factory():
    workers = []

    def make(link: SimulatedLink = SimulatedLink(), timeout_s: float = 10.0) -> CommWorker:
        workers.append(in_memory_worker(link, timeout_s))
        return workers[-1]

    yield make
    for worker in workers:
        worker.shutdown()


def test_worker_submit_and_wait_returns_the_exchange(worker_factory):
    worker = worker_factory()
    worker.submit(RoundUploads(3, 1, deltas_of(2.0, 4.0), {0: 0.5, 1: 0.5}))
    assert worker.in_flight(3) and not worker.in_flight(4)
    result = worker.wait(3)
    assert not worker.in_flight(3)
    assert (result.round, result.block) == (3, 1)
    torch.testing.assert_close(result.aggregate["a"], torch.full((4,), 3.0))


def test_worker_handles_several_rounds_in_flight_in_order(worker_factory):
    worker = worker_factory(SimulatedLink(latency="10ms"))
    for r in range(3):
        worker.submit(RoundUploads(r, r, {0: {"w": torch.full((2,), float(r))}}, {0: 1.0}))
    results = [worker.wait(r) for r in range(3)]
    assert [x.round for x in results] == [0, 1, 2]
    assert [float(x.aggregate["w"][0]) for x in results] == [0.0, 1.0, 2.0]


def on_aggregate(monkeypatch, note) -> None:
    """Call ``note()`` on the thread that aggregates, each time it does."""
    from lightning_parablock.aggregation.aggregator import Aggregator

    original = Aggregator.__call__

    def spy(self, deltas, weights, **options):
        note()
        return original(self, deltas, weights, **options)

    monkeypatch.setattr(Aggregator, "__call__", spy)


def test_exchange_runs_on_a_background_thread(worker_factory, monkeypatch):
    threads = []
    on_aggregate(monkeypatch, lambda: threads.append(threading.current_thread()))
    worker = worker_factory()
    worker.submit(RoundUploads(0, 0, deltas_of(1.0), {0: 1.0}))
    worker.wait(0)
    assert threads and threads[0] is not threading.main_thread()
    assert threads[0].name.startswith("parablock-comm")


def test_a_non_finite_delta_reraises_as_communication_error(worker_factory):
    worker = worker_factory()
    deltas = deltas_of(1.0, 2.0)
    deltas[1]["a"][2] = math.nan
    worker.submit(RoundUploads(5, 2, deltas, {0: 0.5, 1: 0.5}))
    with pytest.raises(CommunicationError, match=r"round 5 \(block 2\).*NonFiniteDeltaError.*Client 1.*'a'") as info:
        worker.wait(5)
    assert isinstance(info.value.__cause__, NonFiniteDeltaError)


def test_mismatched_tensors_reraise_as_communication_error(worker_factory):
    worker = worker_factory()
    worker.submit(RoundUploads(2, 0, {0: {"w": torch.zeros(3)}, 1: {"v": torch.zeros(3)}}, {0: 0.5, 1: 0.5}))
    with pytest.raises(CommunicationError, match=r"round 2 \(block 0\).*ValueError.*Client 1 sent tensors") as info:
        worker.wait(2)
    assert isinstance(info.value.__cause__, ValueError)
    # The thread survives a failed exchange: the next round goes through.
    worker.submit(RoundUploads(3, 0, {0: {"w": torch.ones(3)}}, {0: 1.0}))
    torch.testing.assert_close(worker.wait(3).aggregate["w"], torch.ones(3))


def test_mismatched_shapes_reraise_as_communication_error(worker_factory):
    worker = worker_factory()
    worker.submit(RoundUploads(1, 0, {0: {"w": torch.zeros(3)}, 1: {"w": torch.zeros(1)}}, {0: 0.5, 1: 0.5}))
    with pytest.raises(CommunicationError, match=r"round 1 .*shape \(1,\), expected \(3,\)"):
        worker.wait(1)


def test_a_slow_exchange_times_out_instead_of_hanging(worker_factory):
    # 250 kB up and down over 1 MB/s is 0.5 s of link time; the timeout is 0.02 s.
    worker = worker_factory(SimulatedLink("1MB/s"), timeout_s=0.02)
    worker.submit(RoundUploads(9, 4, {0: {"w": torch.zeros(62_500)}}, {0: 1.0}))
    start = time.perf_counter()
    with pytest.raises(CommunicationError, match=r"round 9 \(block 4\) did not finish within comm_timeout=0.02s"):
        worker.wait(9)
    assert time.perf_counter() - start < 0.3  # gave up well before the exchange could finish
    assert not worker.in_flight(9)


def test_shutdown_is_idempotent_and_the_worker_restarts_on_submit():
    worker = in_memory_worker(SimulatedLink(), 5.0)
    worker.shutdown()  # before any thread exists
    worker.submit(RoundUploads(0, 0, deltas_of(1.0), {0: 1.0}))
    worker.shutdown()  # drops the uncollected exchange
    assert not worker.in_flight(0)
    worker.shutdown()
    worker.submit(RoundUploads(1, 0, deltas_of(2.0), {0: 1.0}))
    torch.testing.assert_close(worker.wait(1).aggregate["a"], torch.full((4,), 2.0))
    worker.shutdown()


def test_communication_overlaps_compute_on_the_main_thread(worker_factory):
    # The exchange is 0.3 s of modelled latency (0.15 s each way); the main thread computes for 0.3 s meanwhile.
    worker = worker_factory(SimulatedLink(latency="150ms"))
    start = time.perf_counter()
    worker.submit(RoundUploads(0, 0, deltas_of(1.0, 3.0), {0: 0.5, 1: 0.5}))
    computed = 0
    while time.perf_counter() - start < 0.3:  # busy compute, holding the GIL between checks
        computed += int(torch.ones(16, 16).sum())
    result = worker.wait(0)
    total = time.perf_counter() - start
    assert result.link_seconds == pytest.approx(0.3)
    assert computed > 0
    assert total < 0.5, f"comm and compute took {total:.2f}s: they ran one after the other, not overlapped"
    torch.testing.assert_close(result.aggregate["a"], torch.full((4,), 2.0))


def test_shutdown_releases_a_thread_sleeping_out_a_long_link():
    worker = in_memory_worker(SimulatedLink(latency="30s"), 60)
    worker.submit(RoundUploads(0, 0, {0: {"w": torch.zeros(2)}}, {0: 1.0}))
    time.sleep(0.2)  # the exchange is now waiting out its modelled 60 s
    (thread,) = [t for t in threading.enumerate() if t.name.startswith("parablock-comm")]
    worker.shutdown()
    thread.join(timeout=5)
    assert not thread.is_alive()  # the interpreter would otherwise wait for it at exit


# --------------------------------------------------------------------------- the comm thread's torch threads

openmp_only = pytest.mark.skipif(
    "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info(),
    reason="torch's native thread pool is process-wide: the worker leaves its size alone",
)


@openmp_only
def test_the_comm_thread_runs_torch_with_one_thread_and_leaves_other_threads_theirs(worker_factory, monkeypatch):
    seen = []
    on_aggregate(monkeypatch, lambda: seen.append(torch.get_num_threads()))
    main_threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs with 1, which the worker would have nothing to change about
    try:
        worker = worker_factory()
        worker.submit(RoundUploads(0, 0, deltas_of(1.0), {0: 1.0}))
        worker.wait(0)
        assert seen == [1]
        assert torch.get_num_threads() == 2  # the training thread's count
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]  # a thread that starts torch afterwards gets what it would have got
    finally:
        torch.set_num_threads(main_threads)


@openmp_only
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_an_exchange_starts_no_openmp_team_beside_the_training_threads(tmp_path):
    # A second team makes libgomp throttle the training thread's team (sleep, not spin, between parallel
    # regions) for the rest of the fit. In a fresh process at 2 threads, the exchange adds the comm thread alone.
    script = tmp_path / "count_threads.py"
    script.write_text(
        "import os, torch\n"
        "from lightning_parablock.aggregation import MeanAggregator\n"
        "from lightning_parablock.comm.in_memory import InMemoryTransport\n"
        "from lightning_parablock.comm.link import SimulatedLink\n"
        "from lightning_parablock.comm.transport import RoundUploads\n"
        "from lightning_parablock.comm.worker import CommWorker\n"
        "def in_memory_worker(link, timeout_s): return CommWorker(InMemoryTransport(MeanAggregator(), link), timeout_s)\n"
        "def threads(): return len(os.listdir('/proc/self/task'))\n"
        "assert torch.get_num_threads() == 2\n"
        "(torch.ones(1 << 20) * 2).sum()  # the training thread's team\n"
        "before = threads()\n"
        "worker = in_memory_worker(SimulatedLink(), 60)\n"
        "big = {0: {'w': torch.ones(1 << 20)}, 1: {'w': torch.ones(1 << 20)}}  # far above torch's parallel grain\n"
        "worker.submit(RoundUploads(0, 0, big, {0: 0.5, 1: 0.5}))\n"
        "worker.wait(0)\n"
        "print(threads() - before)\n"
        "worker.shutdown()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1", "the comm thread started threads of its own"


def test_a_worker_nobody_shut_down_stops_its_thread_before_the_interpreter_exits(tmp_path):
    # A daemon thread still inside torch at interpreter exit aborts the process; the worker stops it at exit.
    script = tmp_path / "forgotten_worker.py"
    script.write_text(
        "import torch\n"
        "from lightning_parablock.aggregation import MeanAggregator\n"
        "from lightning_parablock.comm.in_memory import InMemoryTransport\n"
        "from lightning_parablock.comm.link import SimulatedLink\n"
        "from lightning_parablock.comm.transport import RoundUploads\n"
        "from lightning_parablock.comm.worker import CommWorker\n"
        "def in_memory_worker(link, timeout_s): return CommWorker(InMemoryTransport(MeanAggregator(), link), timeout_s)\n"
        "shutdown = CommWorker.shutdown\n"
        "def reporting(self, join_s=5.0):\n"
        "    print('shut down', join_s, flush=True)\n"
        "    shutdown(self, join_s)\n"
        "CommWorker.shutdown = reporting\n"
        "worker = in_memory_worker(SimulatedLink(), 60)\n"
        "worker.submit(RoundUploads(0, 0, {0: {'w': torch.ones(8)}}, {0: 1.0}))\n"
        "worker.wait(0)\n"
        "finished = in_memory_worker(SimulatedLink(), 60)\n"
        "finished.submit(RoundUploads(0, 0, {0: {'w': torch.ones(8)}}, {0: 1.0}))\n"
        "finished.wait(0)\n"
        "finished.shutdown(join_s=2.0)  # shut down by its owner: not again at exit\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["shut down 2.0", "shut down 1.0"], done.stdout


def test_a_running_worker_is_not_kept_alive_by_its_exit_hook():
    worker = in_memory_worker(SimulatedLink(), 10)
    worker.submit(RoundUploads(0, 0, {0: {"w": torch.ones(4)}}, {0: 1.0}))
    worker.wait(0)
    alive = weakref.ref(worker)
    del worker
    gc.collect()
    assert alive() is None
