"""What a federated fit does about faults: another rank's failure, SIGTERM, and SLURM's requeue signal.

Installed for one fit and removed at its teardown. With several processes, a failing rank publishes why and
every other rank stops naming it (:class:`FaultWatch`), and SIGTERM is agreed on at turn starts so every rank
stops at the same point (:class:`TurnStartSigterm`). SLURM's requeue signal is turned into a checkpoint at the
next round's end on every rank (:class:`RoundEndRequeue`), one process or several.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_parablock.fault_tolerance.fault_watch import FaultWatch
from lightning_parablock.fault_tolerance.preemption import RoundEndRequeue, TurnStartSigterm

if TYPE_CHECKING:
    import lightning.pytorch as pl


class FaultHandling:
    """The fault watch, the SIGTERM agreement and the requeue handler of one fit."""

    def __init__(self) -> None:
        self._watch: Optional[FaultWatch] = None
        self._sigterm: Optional[TurnStartSigterm] = None
        self._requeue: Optional[RoundEndRequeue] = None

    def install(self, trainer: "pl.Trainer", distributed: bool, batches_per_turn: Callable[[], int]) -> None:
        """Take over the signal handlers (before Lightning registers them) and, with several ranks, watch them."""
        if distributed and self._watch is None:
            self._watch = FaultWatch()
        if distributed and self._sigterm is None:
            self._sigterm = TurnStartSigterm(trainer, batches_per_turn)
            self._sigterm.install()
        if self._requeue is None:
            self._requeue = RoundEndRequeue(trainer)
            self._requeue.install()

    def report(self, error: BaseException, round_index: Optional[int]) -> None:
        """After ``error`` on this rank: name a peer's failure if one caused it, else publish this rank's own.

        A SIGTERM is no fault: every rank stops at the same turn start.
        """
        if self._watch is None or isinstance(error, SIGTERMException):
            return
        if not self._watch.report_peer_fault(error, round_index):
            self._watch.publish(round_index, error)

    def at_round_end(self) -> None:
        """Every rank has applied the round's boundary: the one point where a requeue checkpoint can be saved."""
        if self._requeue is not None:
            self._requeue.at_round_end()

    def uninstall(self) -> None:
        """Give Lightning its handlers back and stop watching."""
        if self._sigterm is not None:
            self._sigterm.uninstall()
            self._sigterm = None
        if self._requeue is not None:
            self._requeue.uninstall()
            self._requeue = None
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
