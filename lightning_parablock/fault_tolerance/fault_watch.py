"""Faults across ranks: a failing rank publishes why, every other rank stops naming it."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

import torch.distributed as dist

from lightning_parablock._compat import default_store

_FAULT_KEY = "parablock/fault"


_LOST_PEER_TEXTS = ("Connection closed", "Connection reset", "Broken pipe", "gloo", "NCCL", "comm_timeout")


def is_lost_peer_error(error: BaseException) -> bool:
    """Whether ``error`` (or an error it came from) is what a rank gets when another rank stopped first."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (dist.DistError, ConnectionError, TimeoutError)):
            return True
        if any(text in str(error) for text in _LOST_PEER_TEXTS):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class FaultWatch:
    """Stops this rank when another rank publishes a failure, naming that rank and the round.

    Without it a rank whose peer raised would wait in the next collective until a timeout, or be
    killed without a word by the launcher.
    """

    def __init__(self, poll_s: float = 1.0) -> None:
        self.rank = dist.get_rank()
        self._store = default_store()
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="parablock-faultwatch", daemon=True)
        self._thread.start()

    def publish(self, round_index: Optional[int], error: BaseException) -> None:
        """Tell every other rank that this one failed, and why."""
        where = f" in round {round_index}" if round_index is not None else ""
        cause = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        message = f"rank {self.rank} failed{where}: {cause}"
        try:
            self._store.set(_FAULT_KEY, f"{self.rank}|{message}")
        except Exception:  # noqa: BLE001 - the store's host is gone: the others find out from their collectives
            pass

    def report_peer_fault(self, error: BaseException, wait_s: float = 3.0) -> bool:
        """After ``error`` here: if another rank published a failure, say so and return True.

        A peer that raises closes its connections before this rank's watcher polls, so this rank's own error
        is often gloo's "Connection closed by peer"; the peer's own cause is what the user needs to read, and
        for such an error it is worth waiting up to ``wait_s`` for it. Any other error is this rank's own:
        it looks once and publishes at once.
        """
        if not is_lost_peer_error(error):
            wait_s = 0.0
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self._store.check([_FAULT_KEY]):
                    rank, _, message = self._store.get(_FAULT_KEY).decode().partition("|")
                    if int(rank) != self.rank:
                        print(f"[rank {self.rank}] lightning_parablock: stopping because {message}.", file=sys.stderr, flush=True)
                        return True
            except Exception:  # noqa: BLE001 - the store's host is gone: nothing more to learn
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop watching (training ended here); waits for the thread so it is out of the store at exit."""
        self._stop.set()
        self._thread.join(timeout=5 * self._poll_s)

    def _watch(self) -> None:
        unreachable = 0
        while not self._stop.wait(self._poll_s):
            try:
                if not self._store.check([_FAULT_KEY]):
                    unreachable = 0
                    continue
                value = self._store.get(_FAULT_KEY).decode()
            except Exception as error:  # noqa: BLE001 - the store's host (rank 0) may be gone
                unreachable += 1
                if unreachable >= 3:
                    self._exit(f"the job's store on rank 0 is unreachable ({type(error).__name__}: {error})")
                    return
                continue
            rank, _, message = value.partition("|")
            if int(rank) != self.rank:
                self._exit(message)
            return

    def _exit(self, cause: str) -> None:
        if self._stop.is_set():
            return
        print(
            f"[rank {self.rank}] lightning_parablock: stopping because {cause}. No process is left waiting"
            " in a collective; resume from the last checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)
