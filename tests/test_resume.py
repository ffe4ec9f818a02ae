"""A run stopped at a round boundary resumes to the same final model as an uninterrupted one."""

import os
import signal
from datetime import timedelta

import pytest
import torch
from helpers import quiet_trainer, slurm_variables
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors import signal_connector
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback


class Crash(Callback):
    def __init__(self, at_round, at_batch=None):
        self.at_round, self.at_batch = at_round, at_batch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at_round and self.at_batch is None:
            raise RuntimeError("simulated crash")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.module = pl_module
        if trainer.current_epoch == self.at_round and batch_idx == self.at_batch:
            raise RuntimeError("simulated crash")


def run(
    tmp_path,
    staleness,
    callbacks=(),
    ckpt_path=None,
    num_clients=3,
    layers_per_block=1,
    optimizer_state="reset",
    checkpoint=None,
    validate=False,
    **trainer_kwargs,
):
    module = ValidatingToy(optimizer="adamw")
    checkpoint = checkpoint or ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(
            num_clients=num_clients,
            local_steps=2,
            clients_per_round=2,
            layers_per_block=layers_per_block,
            optimizer_state=optimizer_state,
        ),
        callbacks=[ParaBlockCallback(staleness=staleness), checkpoint, *callbacks],
        max_epochs=6,
        enable_checkpointing=True,
        **trainer_kwargs,
    )
    val_loader = toy_loader(toy_dataset(n=8)) if validate else None
    trainer.fit(module, toy_loader(toy_dataset()), val_loader, ckpt_path=ckpt_path, weights_only=ckpt_path is not None)
    return module, trainer


class ValidatingToy(ToyModule):
    def validation_step(self, batch, batch_idx):
        from toy import toy_loss

        self.log("val_loss", toy_loss(self, batch))


def assert_same_parameters(a, b):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize(("staleness", "optimizer_state"), [(1, "reset"), (2, "reset"), (1, "per_block")])
def test_resume_after_crash_is_bit_identical(tmp_path, staleness, optimizer_state):
    uninterrupted, _ = run(tmp_path / "a", staleness, optimizer_state=optimizer_state)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", staleness, callbacks=[Crash(at_round=3)], optimizer_state=optimizer_state)
    assert (tmp_path / "b" / "last.ckpt").exists()
    resumed, trainer = run(tmp_path / "b", staleness, ckpt_path="last", optimizer_state=optimizer_state)
    for (name, a), b in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert len([r for r in trainer.callbacks[0].records if not r.flush]) == 6


def test_checkpoint_from_another_federation_is_refused(tmp_path):
    run(tmp_path, 1)
    with pytest.raises(MisconfigurationException, match="num_clients=3.*num_clients=4"):
        run(tmp_path / "other", 1, ckpt_path=str(tmp_path / "last.ckpt"), num_clients=4)
    with pytest.raises(MisconfigurationException, match="4 blocks .* 2 blocks"):
        run(tmp_path / "other", 1, ckpt_path=str(tmp_path / "last.ckpt"), layers_per_block=2)


@pytest.mark.parametrize("cadence", [dict(every_n_train_steps=4), dict(train_time_interval=timedelta(minutes=5))])
def test_step_or_time_based_checkpoints_are_refused_before_training(tmp_path, cadence):
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=3, local_steps=2),
        callbacks=[ParaBlockCallback(), ModelCheckpoint(dirpath=tmp_path, **cadence)],
        max_epochs=2,
        enable_checkpointing=True,
    )
    with pytest.raises(MisconfigurationException, match="inside a federated round"):
        trainer.fit(ToyModule(), toy_loader(toy_dataset()))


class SaveMidRound(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            trainer.save_checkpoint("mid-round.ckpt")


def test_checkpoint_in_the_middle_of_a_round_is_refused():
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=3, local_steps=2),
        callbacks=[ParaBlockCallback(), SaveMidRound()],
        max_epochs=2,
    )
    with pytest.raises(MisconfigurationException, match="middle of round 0"):
        trainer.fit(ToyModule(), toy_loader(toy_dataset()))


def test_a_killed_process_resumes_bit_identically(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    uninterrupted, _ = run(tmp_path / "a", 1)
    marker = tmp_path / "stalled"
    tests_dir = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, str(tests_dir / "crash_run.py"), str(tmp_path / "b"), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert child.poll() is None, f"the training process exited early with {child.returncode}"
            assert time.monotonic() < deadline, "the training process never reached round 3"
            time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    resumed, _ = run(tmp_path / "b", 1, ckpt_path="last")
    for (name, a), b in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_resume_from_checkpoints_saved_at_validation_end(tmp_path):
    """ModelCheckpoint defers to validation when it does not run every round; the boundary comes first."""
    trainer_kwargs = dict(check_val_every_n_epoch=2, validate=True)

    def checkpoint(directory):
        return ModelCheckpoint(dirpath=directory, save_last=True, monitor="val_loss", save_top_k=-1)

    uninterrupted, _ = run(tmp_path / "a", 1, checkpoint=checkpoint(tmp_path / "a"), **trainer_kwargs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", 1, [Crash(at_round=4)], checkpoint=checkpoint(tmp_path / "b"), **trainer_kwargs)
    resumed, _ = run(tmp_path / "b", 1, ckpt_path="last", checkpoint=checkpoint(tmp_path / "b"), **trainer_kwargs)
    assert_same_parameters(uninterrupted, resumed)


def test_per_block_optimizer_state_survives_two_resumes(tmp_path):
    uninterrupted, _ = run(tmp_path / "a", 1, optimizer_state="per_block")
    for crash_round in (2, 4):
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(
                tmp_path / "b",
                1,
                [Crash(at_round=crash_round)],
                ckpt_path="last" if crash_round == 4 else None,
                optimizer_state="per_block",
            )
    resumed, _ = run(tmp_path / "b", 1, ckpt_path="last", optimizer_state="per_block")
    assert_same_parameters(uninterrupted, resumed)


def test_a_crash_mid_round_with_save_on_exception_keeps_the_real_error_and_the_global_model(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_on_exception=True)
    crash = Crash(at_round=0, at_batch=2)  # client 1's turn: the model holds its view
    with pytest.warns(UserWarning, match="Skipped while handling an exception"):
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(tmp_path, 1, [crash], checkpoint=checkpoint)
    assert not list(tmp_path.glob("*.ckpt"))
    # round 0 never reached its boundary, so the global model is still the initial one
    assert_same_parameters(crash.module, ToyModule(optimizer="adamw"))


def test_validating_a_checkpoint_leaves_the_next_fit_alone(tmp_path):
    run(tmp_path, 1)
    module, trainer = run(tmp_path / "fresh", 1)
    trainer.validate(module, toy_loader(toy_dataset(n=8)), ckpt_path=str(tmp_path / "last.ckpt"), weights_only=True)
    assert trainer.strategy.checkpoint.restored is None


class RequeueSignal(Callback):
    """SLURM's ``--signal=SIGUSR1@90``: the requeue signal arrives in the middle of a round."""

    def __init__(self, at_round: int) -> None:
        self.at_round = at_round

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.at_round and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_slurms_requeue_signal_mid_round_saves_at_the_rounds_end_and_the_run_resumes_from_it(tmp_path, monkeypatch):
    # Lightning saves in the signal handler, mid-round, where nothing consistent can be saved; the
    # strategy saves at the round's end instead, and the job is requeued as Lightning does it.
    for name, value in slurm_variables().items():
        monkeypatch.setenv(name, value)
    requeued: list[list[str]] = []
    monkeypatch.setattr(signal_connector, "call", lambda command, **_: requeued.append(command) or 0)
    uninterrupted, _ = run(tmp_path / "a", 1)
    slurm = dict(plugins=[SLURMEnvironment(auto_requeue=True)], default_root_dir=tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):  # the job is stopped after the requeue
        run(tmp_path / "b", 1, callbacks=[RequeueSignal(at_round=2), Crash(at_round=4)], **slurm)
    assert requeued == [["scontrol", "requeue", "4242"]]
    saved = torch.load(tmp_path / "b" / "hpc_ckpt_1.ckpt", weights_only=False)
    assert saved["epoch"] == 2 and saved["federation"]["unaggregated"] == {2: saved["federation"]["unaggregated"][2]}
    resumed, _ = run(tmp_path / "c", 1, ckpt_path=str(tmp_path / "b" / "hpc_ckpt_1.ckpt"))
    assert_same_parameters(uninterrupted, resumed)
