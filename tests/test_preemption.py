"""Preemption signals: the handlers only note them; the ranks agree at turn starts (SIGTERM) or round ends (requeue).

One process with a world-size-1 gloo group stands in for a rank; the two-process run is in
``test_distributed.py``.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch.distributed as dist
from helpers import slurm_variables
from lightning import Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_parablock.fault_tolerance.preemption import RoundEndRequeue, TurnStartSigterm


@pytest.fixture
def collectives(monkeypatch):
    """Every collective called, by name; ``peer_flag`` is what the other ranks add to the all-reduce."""
    calls: list[str] = []
    peer = {"flag": 0}
    real_all_reduce = dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        calls.append("all_reduce")
        tensor.clamp_(min=peer["flag"])  # MAX with the peers' notes
        return real_all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)  # this rank and the peers
    monkeypatch.setattr(dist, "broadcast", lambda *a, **k: calls.append("broadcast"))
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    return calls, peer


class Launcher:
    def __init__(self) -> None:
        self.killed: list[int] = []

    def kill(self, signum: int) -> None:
        self.killed.append(signum)


def installed(batches_per_turn: int = 3) -> tuple[Trainer, TurnStartSigterm]:
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    trainer.strategy._launcher = Launcher()
    sigterm = TurnStartSigterm(trainer, lambda: batches_per_turn)
    sigterm.install()
    return trainer, sigterm


def check(trainer: Trainer) -> None:
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor()


def test_the_handler_notes_the_signal_without_a_collective_and_forwards_it_once(one_rank_group, collectives):
    # Lightning's own handler broadcasts from inside the handler, where it can meet another rank's
    # round-end all-gather; this one only notes the signal and tells the processes it launched.
    calls, _ = collectives
    trainer, _ = installed()
    trainer._signal_connector.register_signal_handlers()  # as Trainer._run does, after strategy.setup
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        trainer._signal_connector.teardown()
    assert calls == []
    assert trainer.strategy.launcher.killed == [signal.SIGTERM]
    assert not trainer.received_sigterm  # Lightning's loops stop on it alone: it waits for the ranks to agree


def test_the_ranks_agree_at_turn_starts_only_and_then_stop_together(one_rank_group, collectives):
    calls, _ = collectives
    trainer, sigterm = installed(batches_per_turn=3)
    for _ in range(4):  # a turn of three batches and the next one's first, no signal: a check per turn start
        check(trainer)
    assert calls == ["all_reduce", "all_reduce"]
    sigterm._note(signal.SIGTERM, None)
    check(trainer)  # within the turn: no check, the turn runs on
    check(trainer)
    assert calls == ["all_reduce", "all_reduce"]
    with pytest.raises(SIGTERMException):
        check(trainer)  # the next turn start
    assert calls[2:] == ["all_reduce", "barrier"]
    assert trainer.received_sigterm


def test_a_sigterm_on_another_rank_stops_this_one_at_the_same_turn_start(one_rank_group, collectives):
    _, peer = collectives
    trainer, _ = installed(batches_per_turn=2)
    check(trainer)
    peer["flag"] = 1
    check(trainer)  # within the turn
    with pytest.raises(SIGTERMException):
        check(trainer)


def test_uninstall_gives_lightning_its_own_handling_back(one_rank_group):
    trainer, sigterm = installed()
    connector, loop = trainer._signal_connector, trainer.fit_loop.epoch_loop
    assert "_sigterm_notifier_fn" in vars(connector) and "_broadcast_sigterm_tensor" in vars(loop)
    sigterm.uninstall()
    assert "_sigterm_notifier_fn" not in vars(connector) and "_broadcast_sigterm_tensor" not in vars(loop)
    assert connector._sigterm_notifier_fn.__func__ is type(connector)._sigterm_notifier_fn


def test_a_requeue_signal_on_any_rank_runs_lightnings_save_and_requeue_on_every_rank_at_the_round_end(
    one_rank_group, collectives, monkeypatch
):
    calls, peer = collectives
    handled: list[int] = []
    lightnings_handler = lambda self, signum, frame: handled.append(signum)  # noqa: E731 - save, then requeue
    monkeypatch.setattr(_SignalConnector, "_slurm_sigusr_handler_fn", lightnings_handler)
    for name, value in slurm_variables().items():
        monkeypatch.setenv(name, value)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, plugins=[SLURMEnvironment(auto_requeue=True)])
    requeue = RoundEndRequeue(trainer)
    requeue.install()
    trainer._signal_connector._slurm_sigusr_handler_fn(signal.SIGUSR1, None)  # the handler only notes it
    assert handled == [] and calls == []
    requeue.at_round_end()
    assert handled == [signal.SIGUSR1] and calls == ["all_reduce"]
    requeue.at_round_end()  # acted on once
    assert handled == [signal.SIGUSR1]
    peer["flag"] = int(signal.SIGUSR1)  # another rank was signalled: this one saves with it
    requeue.at_round_end()
    assert handled == [signal.SIGUSR1, signal.SIGUSR1]
    requeue.uninstall()
    assert "_slurm_sigusr_handler_fn" not in vars(trainer._signal_connector)


def test_without_slurms_auto_requeue_nothing_is_taken_over_and_a_round_end_costs_no_collective(
    one_rank_group, collectives, monkeypatch
):
    calls, _ = collectives
    trainer = Trainer(accelerator="cpu", devices=1, logger=False)
    requeue = RoundEndRequeue(trainer)
    requeue.install()
    assert "_slurm_sigusr_handler_fn" not in vars(trainer._signal_connector)
    requeue.at_round_end()
    assert calls == []
