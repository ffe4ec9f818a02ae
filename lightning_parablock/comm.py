"""The link between clients and server, and the background thread that uses it.

A :class:`SimulatedLink` models bandwidth and latency. The :class:`CommWorker`
does the real work of one exchange on a background thread (device-to-host
copies of every client's delta, the aggregation) and then waits only for what is
left of the modelled link time, so compute on the main thread overlaps it just
as it would overlap a real network.
"""

from __future__ import annotations

import atexit
import functools
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

import torch
from torch import Tensor
from torch.profiler import record_function

from lightning_parablock.aggregate import Aggregator
from lightning_parablock.validation import check_float, check_positive
from lightning_parablock.compress import EncodedTensor, as_encoded, decode_delta, encoded_nbytes
from lightning_parablock.cuda_overlap import COPY_RANGE, EXCHANGE_RANGE, copy_to_host

_BYTE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30,
    "bit": 1 / 8, "kbit": 10**3 / 8, "mbit": 10**6 / 8, "gbit": 10**9 / 8,
}  # fmt: skip
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
_BANDWIDTH = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zµ]+)\s*(?:/\s*s|ps)\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zµ]*)\s*$", re.IGNORECASE)


def parse_bandwidth(value: Union[str, float, int], name: Optional[str] = None) -> float:
    """Bytes per second from ``"100MB/s"``, ``"1Gbit/s"``, ``"800Mbps"`` or a number of bytes per second.

    ``name`` is the argument the value was given as (``bandwidth``); an error names it.
    """
    where = f"`{name}`: " if name else ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bytes_per_second = float(value)
    else:
        match = _BANDWIDTH.match(str(value))
        raw_unit = match.group(2) if match else ""
        unit = raw_unit.lower()
        if raw_unit.endswith("b") and unit[:-1] + "bit" in _BYTE_UNITS:
            unit = unit[:-1] + "bit"  # "800Mbps", "800Mb/s": a lower-case b means bits, an upper-case B bytes
        if not match or unit not in _BYTE_UNITS:
            raise ValueError(
                f"{where}Could not parse bandwidth {value!r}. Use a positive number with a unit per second, e.g."
                " '100MB/s', '1.5GiB/s', '800Mbit/s', '800Mbps', or a number of bytes per second."
            )
        bytes_per_second = float(match.group(1)) * _BYTE_UNITS[unit]
    if not bytes_per_second > 0:
        raise ValueError(f"{f'`{name}`' if name else 'Bandwidth'} must be positive, got {value!r}.")
    return bytes_per_second


def parse_duration(value: Union[str, float, int], name: Optional[str] = None) -> float:
    """Seconds from ``"20ms"``, ``"0.5s"``, ``"150us"`` or a number of seconds.

    ``name`` is the argument the value was given as (``latency``, ``comm_timeout``); an error names it.
    """
    where = f"`{name}`: " if name else ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        unit = (match.group(2) or "s").lower() if match else ""
        if not match or unit not in _TIME_UNITS:
            raise ValueError(
                f"{where}Could not parse duration {value!r}. Use a number with a unit (s, ms, us), e.g. '20ms',"
                " '1.5s', '150us', or a number of seconds."
            )
        seconds = float(match.group(1)) * _TIME_UNITS[unit]
    if seconds < 0:
        raise ValueError(f"{f'`{name}`' if name else 'A duration'} cannot be negative, got {value!r}.")
    return seconds


class SimulatedLink:
    """A client-server link of fixed bandwidth and latency, each client with its own link.

    Args:
        bandwidth: bytes per second each way, e.g. ``"100MB/s"`` (the paper studies 50, 100 and
            150 MB/s). ``None`` models an infinitely fast link: only the real work is timed.
        latency: one-way latency added to every transfer, e.g. ``"20ms"``.
    """

    def __init__(self, bandwidth: Optional[Union[float, str]] = None, latency: Union[float, str] = 0.0) -> None:
        # float before str: a number on the command line ("--...bandwidth 1e8") parses as bytes per second
        self.bandwidth = bandwidth
        self.latency = latency
        self.bytes_per_second = (
            None if bandwidth is None else check_positive("bandwidth", parse_bandwidth(bandwidth, "bandwidth"))
        )
        self.latency_s = check_float("latency", parse_duration(latency, "latency"), minimum=0.0)

    def transfer_seconds(self, nbytes: int) -> float:
        """Modelled time to move ``nbytes`` one way."""
        if self.bytes_per_second is None:
            return self.latency_s
        return self.latency_s + nbytes / self.bytes_per_second

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bandwidth={self.bandwidth!r}, latency={self.latency!r})"


class CommunicationError(RuntimeError):
    """The exchange of a round failed or timed out on the communication thread."""


@dataclass
class RoundExchange:
    """What one exchange produced and what it cost."""

    round: int
    block: int
    aggregate: Optional[dict[str, Tensor]]  # Δ_t in fp32, on the host; None when no sender was kept
    skipped_clients: list[int]  # left out for a non-finite delta
    upload_bytes: dict[int, int]  # per client
    download_bytes: int  # the aggregate, received by each client
    link_seconds: float  # modelled: clients in parallel, upload then download
    work_seconds: float  # measured: copies and aggregation on the thread


def tensor_bytes(tensors: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Transport(Protocol):
    """How one round's deltas meet: returns the aggregate after the (modelled or real) transfer.

    Runs on the communication thread. ``deltas`` are the senders this process hosts, as fp32 tensors or as
    encoded by a :class:`~lightning_parablock.compress.Codec` (decoded to fp32 before aggregating; the
    bytes counted are the encoded ones); ``weights`` their
    unnormalized aggregation weights (1 for uniform, the sample count for ``"samples"``), normalized over
    every sender the aggregate keeps. :func:`exchange` keeps every client in this process;
    :class:`~lightning_parablock.collective.CollectiveTransport` adds the other ranks' with torch.distributed.
    """

    def __call__(
        self,
        round_index: int,
        block: int,
        deltas: Mapping[int, Mapping[str, Union[Tensor, EncodedTensor]]],
        weights: Mapping[int, float],
        link: SimulatedLink,
        aggregator: Aggregator,
        stop: threading.Event,
    ) -> RoundExchange: ...


def exchange(
    round_index: int,
    block: int,
    deltas: Mapping[int, Mapping[str, Union[Tensor, EncodedTensor]]],
    weights: Mapping[int, float],
    link: SimulatedLink,
    aggregator: Optional[Aggregator] = None,
    stop: Optional[threading.Event] = None,
) -> RoundExchange:
    """The in-memory transport: upload every delta, aggregate, download; return after the modelled link time."""
    start = time.perf_counter()
    with torch.no_grad():  # grad mode is per thread: the worker starts with it on
        with record_function(COPY_RANGE):
            uploaded = {
                client: {name: t.to("cpu") for name, t in as_encoded(delta).items()} for client, delta in deltas.items()
            }
        upload_bytes = {client: encoded_nbytes(delta) for client, delta in uploaded.items()}
        result = (aggregator or Aggregator())({c: decode_delta(d) for c, d in uploaded.items()}, weights)
    download_bytes = tensor_bytes(result.aggregate)
    return finish_exchange(
        round_index, block, result.aggregate, result.skipped_clients, upload_bytes, download_bytes, link, start, stop
    )


def finish_exchange(
    round_index: int,
    block: int,
    aggregate: Optional[dict[str, Tensor]],
    skipped_clients: list[int],
    upload_bytes: dict[int, int],
    download_bytes: int,
    link: SimulatedLink,
    started_at: float,
    stop: Optional[threading.Event],
) -> RoundExchange:
    """Wait out what is left of the modelled link time after the real work, and describe the exchange."""
    link_seconds = 0.0
    if upload_bytes:
        link_seconds = max(link.transfer_seconds(n) for n in upload_bytes.values()) + link.transfer_seconds(
            download_bytes
        )
    work_seconds = time.perf_counter() - started_at
    if link_seconds > work_seconds:  # an Event, not sleep(): shutdown must not wait for a modelled link
        (stop or threading.Event()).wait(link_seconds - work_seconds)
    return RoundExchange(
        round=round_index,
        block=block,
        aggregate=aggregate,
        skipped_clients=skipped_clients,
        upload_bytes=upload_bytes,
        download_bytes=download_bytes,
        link_seconds=link_seconds,
        work_seconds=work_seconds,
    )


class CommWorker:
    """Runs exchanges on one background daemon thread; the main thread collects them at round boundaries.

    The thread never logs and never touches the model: it reads the deltas it was given and returns a
    new aggregate. Its errors re-raise in the main thread, in :meth:`wait`, with the round. It is a
    daemon thread, so an exchange that never returns (a stalled peer, a user aggregator that hangs)
    cannot keep the process alive after :meth:`wait` gave up on it.

    Args:
        link: the modelled link, waited out after the real work.
        timeout_s: longest wait in :meth:`wait`.
        aggregator: how the server combines deltas.
        transport: how deltas meet; :func:`exchange` (every client in this process) by default.
        describe_stall: what to add to a timeout's message, given the round (e.g. which ranks never joined).
        stage_to_host: start copying CUDA deltas to pinned host memory on a side stream when they are submitted
            (for transports that work on the host); the thread waits for the copies' event, the trainer never.
    """

    def __init__(
        self,
        link: SimulatedLink,
        timeout_s: float,
        aggregator: Optional[Aggregator] = None,
        transport: Transport = exchange,
        describe_stall: Optional[Callable[[int], str]] = None,
        stage_to_host: bool = True,
    ) -> None:
        self.link = link
        self.timeout_s = timeout_s
        self.aggregator = aggregator or Aggregator()
        self.transport = transport
        self.describe_stall = describe_stall
        self.stage_to_host = stage_to_host
        self._queue: Optional[queue.SimpleQueue] = None
        self._thread: Optional[threading.Thread] = None
        self._in_flight: dict[int, tuple[int, Future]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def submit(self, round_index: int, block: int, deltas: Mapping[int, Mapping[str, Tensor]], weights: Mapping[int, float]) -> None:
        """Start the exchange of ``round_index`` behind any exchange already queued."""
        with self._lock:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=_serve, args=(self._queue, self._stop), name="parablock-comm", daemon=True
                )
                self._thread.start()
                _LIVE_WORKERS.add(self)
            future: Future = Future()
            copies: list[Any] = []
            if self.stage_to_host:
                deltas = {client: _stage(delta, copies) for client, delta in deltas.items()}
            job = functools.partial(
                _exchange_after,
                copies,
                self.transport,
                round_index,
                block,
                dict(deltas),
                dict(weights),
                self.link,
                self.aggregator,
                self._stop,
            )
            self._queue.put((future, job))
            self._in_flight[round_index] = (block, future)

    def in_flight(self, round_index: int) -> bool:
        return round_index in self._in_flight

    def wait(self, round_index: int) -> RoundExchange:
        """Block until the exchange of ``round_index`` is done and return it, re-raising its failure."""
        block, future = self._in_flight.pop(round_index)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            future.cancel()
            stall = f" {self.describe_stall(round_index)}" if self.describe_stall is not None else ""
            raise CommunicationError(
                f"The exchange of round {round_index} (block {block}) did not finish within"
                f" comm_timeout={self.timeout_s}s.{stall}"
            ) from None
        except Exception as error:
            raise CommunicationError(
                f"The exchange of round {round_index} (block {block}) failed on the communication thread:"
                f" {type(error).__name__}: {error}"
            ) from error

    def shutdown(self, join_s: float = 5.0) -> None:
        """Stop the thread without waiting for exchanges nobody will collect.

        The thread is given ``join_s`` to finish the exchange it is in: a daemon thread still inside
        torch when the interpreter exits aborts the process ("terminate called without an active
        exception"). One stuck for longer is left behind; being a daemon, it cannot keep the process alive.
        """
        with self._lock:
            self._stop.set()
            for _, future in self._in_flight.values():
                future.cancel()
            self._in_flight.clear()
            if self._queue is not None:
                self._queue.put(None)
                self._queue = None
            self._stop = threading.Event()  # the worker may be used again by a later fit
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=join_s)
        _LIVE_WORKERS.discard(self)


_LIVE_WORKERS: "weakref.WeakSet[CommWorker]" = weakref.WeakSet()


@atexit.register
def _shut_down_live_workers() -> None:
    """A worker nobody shut down (a script that ends without the Trainer's teardown) stops before the interpreter does."""
    for worker in list(_LIVE_WORKERS):
        worker.shutdown(join_s=1.0)


def _stage(delta: Mapping[str, Union[Tensor, EncodedTensor]], copies: list[Any]) -> dict[str, Any]:
    """Host copies of a delta's CUDA tensors, started on a side stream; their events go to ``copies``."""
    staged: dict[str, Any] = {}
    for name, value in delta.items():
        encoded = isinstance(value, EncodedTensor)
        host, done = copy_to_host(value.payload if encoded else {"tensor": value})
        if done is not None:
            copies.append(done)
        staged[name] = EncodedTensor(value.codec, value.shape, host) if encoded else host["tensor"]
    return staged


def _exchange_after(copies: list[Any], transport: Transport, *args: Any) -> RoundExchange:
    """On the thread: wait for the deltas' host copies, then run the exchange."""
    for done in copies:
        done.synchronize()
    with record_function(EXCHANGE_RANGE):
        return transport(*args)


def _serve(jobs: queue.SimpleQueue, stop: threading.Event) -> None:
    """The communication thread: run queued exchanges in order until told to stop."""
    while True:
        item = jobs.get()
        if item is None or stop.is_set():
            return
        future, job = item
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(job())
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which re-raises it
            future.set_exception(error)
