"""A SIGTERM stops every rank at the same turn start, agreed by the ranks themselves.

Lightning 2.x handles SIGTERM with several processes in two places, and both collide with a federation:

- its signal handler broadcasts a flag on the default group from inside the handler. That broadcast
  pairs with whatever collective the other ranks enter next, here often the round-end all-gather of
  the exchange, and the group breaks ("Connection closed by peer") instead of stopping;
- its training loop broadcasts rank 0's flag before every batch: a lockstep point per step (on CUDA
  also a device synchronize for ``.item()``), where clients here need to meet only at the exchange.

:class:`TurnStartSigterm` replaces both while a federated fit runs: the handler only notes the signal
(and forwards it to the launcher's children, as Lightning's does), and at every turn start the ranks
all-reduce their notes, so a SIGTERM on any rank stops every rank at the same turn start with
Lightning's own ``SIGTERMException``. Every rank runs the same batches (idle turns pad the rounds), so
counting the checks Lightning asks for and running every ``batches_per_turn``-th keeps them in line.
The note stays private until the ranks agree: Lightning's loops also stop on their own rank's flag
after a batch or an epoch, which would let one rank leave while another enters the exchange. A signal
after the last turn start lets the fit finish.

Both replacements are Lightning internals (``_SignalConnector._sigterm_notifier_fn`` and
``TrainingEpochLoop._broadcast_sigterm_tensor``); where a Lightning version lacks them, Lightning's
own handling stays.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

if TYPE_CHECKING:
    import lightning.pytorch as pl

# The note goes where Lightning's own "Received SIGTERM" goes: its logger shows INFO by default.
log = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")

_NOTIFIER = "_sigterm_notifier_fn"  # _SignalConnector's handler, read when it registers handlers
_LOOP_CHECK = "_broadcast_sigterm_tensor"  # TrainingEpochLoop's per-batch check


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
        connector, loop = self.trainer._signal_connector, self.trainer.fit_loop.epoch_loop
        if not hasattr(connector, _NOTIFIER) or not hasattr(loop, _LOOP_CHECK):
            return  # another Lightning version: its own handling stays
        setattr(connector, _NOTIFIER, self._note)
        setattr(loop, _LOOP_CHECK, self._check_at_turn_start)

    def uninstall(self) -> None:
        """Give the connector and the loop their own methods back."""
        connector, loop = self.trainer._signal_connector, self.trainer.fit_loop.epoch_loop
        if connector.__dict__.get(_NOTIFIER) == self._note:
            delattr(connector, _NOTIFIER)
        if loop.__dict__.get(_LOOP_CHECK) == self._check_at_turn_start:
            delattr(loop, _LOOP_CHECK)

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
        flag = torch.tensor([int(self._received)], device=self.trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 1:
            self.trainer._signal_connector.received_sigterm = True  # for whatever reads it while stopping
            with contextlib.suppress(Exception):
                dist.barrier()  # every rank leaves together, as Lightning's own check does
            raise SIGTERMException()
