"""The communication thread: a run's exchanges happen on it, in order, while the main thread trains.

The :class:`CommWorker` hands each round's uploads to the run's transport (:mod:`~lightning_parablock.comm.transport`)
on one background thread and gives the result back at the round boundary, so compute on the main thread overlaps
the exchange as it would overlap a real network. The thread runs torch with one thread
(:mod:`~lightning_parablock.comm.torch_threads`): a second OpenMP team beside the training thread's slows every
training step.
"""

from __future__ import annotations

import atexit
import functools
import queue
import threading
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.profiler import record_function

from lightning_parablock.comm.codecs import EncodedTensor
from lightning_parablock.comm.torch_threads import use_one_torch_thread
from lightning_parablock.comm.transport import CommunicationError, ExchangeResult, RoundUploads, Transport
from lightning_parablock.core.device_copies import EXCHANGE_RANGE, HostCopier


class CommWorker:
    """Runs exchanges on one background daemon thread; the main thread collects them at round boundaries.

    The thread never logs and never touches the model: it reads the deltas it was given and returns a
    new aggregate. Its errors re-raise in the main thread, in :meth:`wait`, with the round. It is a
    daemon thread, so an exchange that never returns (a stalled peer, a user aggregator that hangs)
    cannot keep the process alive after :meth:`wait` gave up on it.

    Args:
        transport: how deltas meet (:mod:`~lightning_parablock.comm.transport`).
        timeout_s: longest wait in :meth:`wait`; a timeout's message adds the transport's ``describe_stall``.
        device: the training device. On a GPU the thread makes it its current CUDA device when it starts (the
            current device is per thread: otherwise its first CUDA call, an event wait or a pinned allocation,
            would create a context on GPU 0).

    CUDA deltas are copied to pinned host memory on a side stream when they are submitted (every transport
    works on the host); the thread waits for the copies' event, the trainer never.
    """

    def __init__(self, transport: Transport, timeout_s: float, device: Optional[torch.device] = None) -> None:
        self.transport = transport
        self.timeout_s = timeout_s
        self.device = device
        self._queue: Optional[queue.SimpleQueue] = None
        self._thread: Optional[threading.Thread] = None
        self._in_flight: dict[int, tuple[int, Future]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._host_copies = HostCopier()
        self._exit_hook = functools.partial(_shut_down_at_exit, weakref.WeakMethod(self.shutdown))

    def submit(self, uploads: RoundUploads) -> None:
        """Start the exchange of ``uploads.round`` behind any exchange already queued."""
        with self._lock:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=_serve, args=(self._queue, self._stop, self.device), name="parablock-comm", daemon=True
                )
                self._thread.start()
                atexit.register(self._exit_hook)
            future: Future = Future()
            copies: list[Any] = []
            staged = {client: _stage(delta, copies, self._host_copies) for client, delta in uploads.deltas.items()}
            uploads = RoundUploads(uploads.round, uploads.block, staged, dict(uploads.weights))
            job = functools.partial(_exchange_after, copies, self.transport, uploads, self._stop)
            self._queue.put((future, job))
            self._in_flight[uploads.round] = (uploads.block, future)

    def in_flight(self, round_index: int) -> bool:
        return round_index in self._in_flight

    def wait(self, round_index: int) -> ExchangeResult:
        """Block until the exchange of ``round_index`` is done and return it, re-raising its failure."""
        block, future = self._in_flight.pop(round_index)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            future.cancel()
            stall = f" {self.transport.describe_stall(round_index)}"
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
        atexit.unregister(self._exit_hook)


def _shut_down_at_exit(shutdown: "weakref.WeakMethod[Callable[..., None]]") -> None:
    """A worker nobody shut down (a script that ends without the Trainer's teardown) stops before the interpreter
    does. Registered while its thread runs, through a weak reference: exit handling keeps no worker (nor the
    model its transport reaches) alive."""
    method = shutdown()
    if method is not None:
        method(join_s=1.0)


def _stage(delta: Mapping[str, Union[Tensor, EncodedTensor]], copies: list[Any], copier: HostCopier) -> dict[str, Any]:
    """Host copies of a delta's CUDA tensors, started on a side stream; their events go to ``copies``."""
    staged: dict[str, Any] = {}
    for name, value in delta.items():
        encoded = isinstance(value, EncodedTensor)
        host, done = copier.copy(value.payload if encoded else {"tensor": value})
        if done is not None:
            copies.append(done)
        staged[name] = EncodedTensor(value.codec, value.shape, host) if encoded else host["tensor"]
    return staged


def _exchange_after(copies: list[Any], transport: Transport, uploads: RoundUploads, stop: threading.Event) -> ExchangeResult:
    """On the thread: wait for the deltas' host copies, then run the exchange."""
    for done in copies:
        done.synchronize()
    with record_function(EXCHANGE_RANGE):
        return transport.exchange(uploads, stop)


def _serve(jobs: queue.SimpleQueue, stop: threading.Event, device: Optional[torch.device]) -> None:
    """The communication thread: run queued exchanges in order until told to stop."""
    use_one_torch_thread()
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
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
