"""Faults across ranks: a failing rank publishes why, every other rank stops naming it; a rank lost without a word
(SIGKILL, the out-of-memory killer, a node gone) is named by its heartbeat, which stops."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

import torch.distributed as dist

from lightning_parablock._compat import default_store

_FAULT_KEY = "parablock/fault"
_BEAT_KEY = "parablock/beat/{rank}"


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
    killed without a word by the launcher. Every poll also beats (a counter in the store), so a rank that
    vanished without publishing a cause is told apart from one that is only slow.
    """

    def __init__(self, poll_s: float = 0.25) -> None:
        self.rank = dist.get_rank()
        self._peers = [rank for rank in range(dist.get_world_size()) if rank != self.rank]
        self._store = default_store()
        self._poll_s = poll_s
        self._beats = 0
        self._beat()  # before training: every rank's beat exists when a peer looks for it
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

    def report_peer_fault(self, error: BaseException, round_index: Optional[int] = None, wait_s: float = 3.0) -> bool:
        """After ``error`` here: if another rank published a failure, say so and return True; if a rank was lost
        without a word (its heartbeat stopped), name it and the round, and end this process.

        A peer that raises closes its connections before this rank's watcher polls, so this rank's own error
        is often gloo's "Connection closed by peer"; the peer's own cause is what the user needs to read, and
        for such an error it is worth waiting up to ``wait_s`` for it. Any other error is this rank's own:
        it looks once and publishes at once.
        """
        lost_peer = is_lost_peer_error(error)
        if not lost_peer:
            wait_s = 0.0
        started = time.monotonic()
        beats: Optional[dict[int, Optional[bytes]]] = None  # the peers' beats when this rank noticed the error
        while True:
            try:
                if self._store.check([_FAULT_KEY]):
                    rank, _, message = self._store.get(_FAULT_KEY).decode().partition("|")
                    if int(rank) != self.rank:
                        print(f"[rank {self.rank}] lightning_parablock: stopping because {message}.", file=sys.stderr, flush=True)
                        return True
                if lost_peer:
                    now = self._peer_beats()
                    beats = now if beats is None else beats
                    lost = [rank for rank, beat in now.items() if beat == beats[rank]]
                    if lost and time.monotonic() - started >= 4 * self._poll_s:  # a live peer has beaten since
                        self._exit_lost(lost, round_index)
            except Exception:  # noqa: BLE001 - the store's host is gone: nothing more to learn
                if lost_peer:
                    self._exit_lost([0], round_index, " (it hosts the job's store, which is unreachable)")
                return False
            if time.monotonic() - started >= wait_s:
                return False
            time.sleep(0.05)

    def _peer_beats(self) -> dict[int, Optional[bytes]]:
        """Every other rank's beat count (``None`` for one that never beat)."""
        keys = {rank: _BEAT_KEY.format(rank=rank) for rank in self._peers}
        return {rank: self._store.get(key) if self._store.check([key]) else None for rank, key in keys.items()}

    def _beat(self) -> None:
        self._beats += 1
        self._store.set(_BEAT_KEY.format(rank=self.rank), str(self._beats))

    def _exit_lost(self, lost: list[int], round_index: Optional[int], note: str = "") -> None:
        """Name the ranks that vanished and end this process: the traceback below would only be a collective's."""
        where = f" in round {round_index}" if round_index is not None else ""
        ranks = f"rank {lost[0]}" if len(lost) == 1 else f"ranks {lost}"
        self._stop.set()
        print(
            f"[rank {self.rank}] lightning_parablock: stopping because {ranks} was lost{where}{note}: its process ended"
            " without reporting a cause (killed, e.g. SIGKILL or the out-of-memory killer, or its machine is gone)."
            " Resume from the last checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    def stop(self) -> None:
        """Stop watching (training ended here); waits for the thread so it is out of the store at exit."""
        self._stop.set()
        self._thread.join(timeout=5 * self._poll_s)

    def _watch(self) -> None:
        unreachable = 0
        while not self._stop.wait(self._poll_s):
            try:
                self._beat()
                if not self._store.check([_FAULT_KEY]):
                    unreachable = 0
                    continue
                value = self._store.get(_FAULT_KEY).decode()
            except Exception as error:  # noqa: BLE001 - the store's host (rank 0) may be gone
                unreachable += 1
                if unreachable * self._poll_s >= 3.0:
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
