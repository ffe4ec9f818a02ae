"""Preemption signals handled where a federation can act on them: turn starts and round ends.

Lightning 2.x acts on a preemption signal inside the signal handler, at whatever point the main
thread happens to be, and with several processes on collectives of the default group:

- **SIGTERM.** The handler broadcasts a flag on the default group from inside the handler. That
  broadcast pairs with whatever collective the other ranks enter next, here often the round-end
  all-gather of the exchange, and the group breaks ("Connection closed by peer") instead of stopping.
  The training loop then broadcasts rank 0's flag before every batch: a lockstep point per step (on
  CUDA also a device synchronize for ``.item()``), where clients here need to meet only at the exchange.
- **SLURM's requeue signal** (``SIGUSR1`` by default, with ``auto_requeue``). The handler saves a
  checkpoint on the spot. In the middle of a round there is no consistent state to save (the
  strategy refuses, so the run crashes instead of being requeued), and with several processes that
  save gathers every rank's clients, a collective inside a signal handler again.

:class:`TurnStartSigterm` (several processes) lets the handler only note the SIGTERM, and forward it to
the launcher's children as Lightning's does; at every turn start the ranks all-reduce their notes, so a
SIGTERM on any rank stops every rank at the same turn start with Lightning's own ``SIGTERMException``.
Every rank runs the same batches (idle turns pad the rounds), so counting the checks Lightning asks for
and running every ``batches_per_turn``-th keeps them in line. The note stays private until the ranks
agree: Lightning's loops also stop on their own rank's flag after a batch or an epoch, which would let
one rank leave while another enters the exchange. A SIGTERM after the last turn start lets the fit finish.

:class:`RoundEndRequeue` (one process or several) lets the handler only note the requeue signal; at
the next round end, once the boundary is applied, the ranks agree and Lightning's own handler runs
there: it saves the checkpoint that resumes the run (``hpc_ckpt_N.ckpt``) and requeues the job.

The replacements are Lightning internals (``_SignalConnector._sigterm_notifier_fn``,
``_SignalConnector._slurm_sigusr_handler_fn`` and ``TrainingEpochLoop._broadcast_sigterm_tensor``);
where a Lightning version lacks them, Lightning's own handling stays.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

from lightning_parablock._compat import (
    SIGTERM_LOOP_CHECK,
    SIGTERM_NOTIFIER,
    SLURM_REQUEUE_HANDLER,
    cluster_environment,
    signal_connector,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

# The note goes where Lightning's own "Received SIGTERM" goes: its logger shows INFO by default.
log = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")



def _give_back(owner: object, attribute: str, replacement: Callable) -> None:
    """Remove ``replacement`` if it still shadows ``attribute``: the class's own method shows through again."""
    if owner.__dict__.get(attribute) == replacement:
        delattr(owner, attribute)


def _max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` any rank holds; every rank calls it at the same point. One process: ``value``."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    flag = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class TurnStartSigterm:
    """Installed on a Trainer for one distributed fit: note SIGTERM locally, agree on it at turn starts.

    Args:
        trainer: the Trainer whose signal connector and training loop it takes over.
        batches_per_turn: how many batches a turn has (read at every check: it is known only once the
            dataloaders are).
    """

    def __init__(self, trainer: pl.Trainer, batches_per_turn: Callable[[], int]) -> None:
        self.trainer = trainer
        self._batches_per_turn = batches_per_turn
        self._asked = 0
        self._received = False  # this rank got SIGTERM; Lightning's flag is set once every rank agrees

    def install(self) -> None:
        """Take over the handler (before Lightning registers it) and the loop's check."""
        connector, loop = signal_connector(self.trainer), self.trainer.fit_loop.epoch_loop
        if not hasattr(connector, SIGTERM_NOTIFIER) or not hasattr(loop, SIGTERM_LOOP_CHECK):
            return  # another Lightning version: its own handling stays
        setattr(connector, SIGTERM_NOTIFIER, self._note)
        setattr(loop, SIGTERM_LOOP_CHECK, self._check_at_turn_start)

    def uninstall(self) -> None:
        """Give the connector and the loop their own methods back."""
        _give_back(signal_connector(self.trainer), SIGTERM_NOTIFIER, self._note)
        _give_back(self.trainer.fit_loop.epoch_loop, SIGTERM_LOOP_CHECK, self._check_at_turn_start)

    def _note(self, signum: int, _: FrameType | None) -> None:
        """The signal handler: no collective here, it could meet any other collective of another rank."""
        log.info(rank_prefixed_message(f"Received SIGTERM: {signum}", self.trainer.local_rank))
        if not self._received:
            launcher = self.trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)  # the processes this one launched stop too
        self._received = True

    def _check_at_turn_start(self) -> None:
        asked, self._asked = self._asked, self._asked + 1
        if asked % self._batches_per_turn() != 0 or not dist.is_initialized():
            return
        if _max_over_ranks(int(self._received), self.trainer.strategy.root_device) == 1:
            signal_connector(self.trainer).received_sigterm = True  # for whatever reads it while stopping
            with contextlib.suppress(Exception):
                dist.barrier()  # every rank leaves together, as Lightning's own check does
            raise SIGTERMException()


class RoundEndRequeue:
    """Installed on a Trainer for one federated fit: SLURM's requeue signal acted on at the next round end.

    Args:
        trainer: the Trainer whose signal connector it takes over.
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self._signum: int | None = None  # the requeue signal received since the last round end

    def install(self) -> None:
        """Take over the handler (before Lightning registers it), where Lightning will register one."""
        connector = signal_connector(self.trainer)
        environment = cluster_environment(self.trainer)
        if hasattr(connector, SLURM_REQUEUE_HANDLER) and isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            setattr(connector, SLURM_REQUEUE_HANDLER, self._note)

    def uninstall(self) -> None:
        """Give the connector its own handler back."""
        _give_back(signal_connector(self.trainer), SLURM_REQUEUE_HANDLER, self._note)

    def _note(self, signum: int, _: FrameType | None) -> None:
        """The signal handler: nothing can be saved mid-round, and no collective may run here."""
        message = f"Received requeue signal {signum}: saving a checkpoint at the round's end"
        log.info(rank_prefixed_message(message, self.trainer.local_rank))
        self._signum = signum

    def at_round_end(self) -> None:
        """After a round's boundary, on every rank: if any rank was signalled, save and requeue as Lightning does."""
        if signal_connector(self.trainer).__dict__.get(SLURM_REQUEUE_HANDLER) != self._note:
            return  # not installed: no rank has a requeue handler, and none joins the all-reduce below
        signum = _max_over_ranks(self._signum or 0, self.trainer.strategy.root_device)
        if not signum:
            return
        self._signum = None
        connector = signal_connector(self.trainer)
        getattr(type(connector), SLURM_REQUEUE_HANDLER)(connector, signum, None)  # Lightning's own: save, then requeue
