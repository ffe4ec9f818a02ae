"""What Lightning users bring: the strategy by name, LearningRateMonitor, last.ckpt as the final model,
and a stuck exchange that cannot keep the process alive."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from lightning import LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback


def test_the_strategy_is_registered_by_name():
    trainer = quiet_trainer(strategy="federated_block", callbacks=[ParaBlockCallback(staleness=1)], max_epochs=2)
    assert isinstance(trainer.strategy, FederatedBlockStrategy)
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    assert trainer.strategy.federation.pending_rounds() == []


class CountingLrModule(ToyModule):
    """Every optimizer it builds has its own learning rate, and each step records the one it used."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd")
        self.built, self.used = 0, []

    def configure_optimizers(self):
        self.built += 1
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.001 * self.built)

    def training_step(self, batch, batch_idx):
        self.used.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_learning_rate_monitor_reads_each_turns_optimizer(tmp_path, interval):
    module = CountingLrModule()
    monitor = LearningRateMonitor(logging_interval=interval)
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=3, local_steps=2),
        callbacks=[ParaBlockCallback(staleness=1), monitor],
        max_epochs=2,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    trainer.fit(module, toy_loader(toy_dataset()))
    (logged,) = monitor.lrs.values()
    if interval == "step":
        assert logged == module.used  # every step, the first of each turn included
    else:
        assert logged == module.used[:: 3 * 2]  # the first client's optimizer of each round
    assert len(set(module.used)) == 6  # one optimizer per client and round


def test_a_learning_rate_monitor_listed_before_the_callback_is_refused_not_moved():
    monitor = LearningRateMonitor(logging_interval="step")
    callbacks = [monitor, ParaBlockCallback(staleness=1)]
    trainer = quiet_trainer(strategy=FederatedBlockStrategy(num_clients=3, local_steps=2), callbacks=callbacks, max_epochs=2)
    with pytest.raises(MisconfigurationException, match="LearningRateMonitor is listed before ParaBlockCallback"):
        trainer.fit(CountingLrModule(), toy_loader(toy_dataset()))
    assert trainer.callbacks[: len(callbacks)] == callbacks  # the user's list is as it was


def test_final_checkpoint_holds_the_flushed_model_and_last_stays_the_resumable_round(tmp_path):
    module = ToyModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_last=True, save_top_k=-1)
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=3, local_steps=2),
        callbacks=[ParaBlockCallback(staleness=2), checkpoint],
        max_epochs=4,
        enable_checkpointing=True,
    )
    trainer.fit(module, toy_loader(toy_dataset()))
    final = torch.load(tmp_path / "final.ckpt", weights_only=True)
    assert final["federation"]["unaggregated"] == {} and all(not p for p in final["federation"]["pending"].values())
    assert final["federation"]["flushed"]
    for name, param in module.state_dict().items():
        assert torch.equal(final["state_dict"][name], param), name
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert sorted(last["federation"]["unaggregated"]) == [2, 3] and not last["federation"]["flushed"]
    assert checkpoint.last_model_path == str(tmp_path / "last.ckpt")  # ModelCheckpoint's own bookkeeping, untouched


def test_a_finished_run_extended_from_last_ckpt_equals_one_longer_run(tmp_path):
    def run(max_epochs, folder, ckpt_path=None):
        module = ToyModule()
        checkpoint = ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_last=True)
        trainer = quiet_trainer(
            strategy=FederatedBlockStrategy(num_clients=3, local_steps=2),
            callbacks=[ParaBlockCallback(staleness=1), checkpoint],
            max_epochs=max_epochs,
            enable_checkpointing=True,
        )
        trainer.fit(module, toy_loader(toy_dataset()), ckpt_path=ckpt_path)
        return module

    straight = run(5, tmp_path / "straight")
    run(3, tmp_path / "extended")
    extended = run(5, tmp_path / "extended", ckpt_path=tmp_path / "extended" / "last.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), extended.state_dict().values()):
        assert torch.equal(a, b), name
    assert (tmp_path / "extended" / "final-v1.ckpt").exists()  # the first run's final.ckpt is left as it was


def test_extending_from_the_final_checkpoint_says_it_is_not_one_longer_run(tmp_path):
    module = ToyModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_last=True)
    callbacks = [ParaBlockCallback(staleness=1), checkpoint]
    trainer = quiet_trainer(strategy=FederatedBlockStrategy(num_clients=3, local_steps=2), callbacks=callbacks, max_epochs=2, enable_checkpointing=True)
    trainer.fit(module, toy_loader(toy_dataset()))
    trainer = quiet_trainer(strategy=FederatedBlockStrategy(num_clients=3, local_steps=2), callbacks=[ParaBlockCallback(staleness=1)], max_epochs=3)
    with pytest.warns(UserWarning, match="holds the run's final global model.*resume from the checkpoint of its last round"):
        trainer.fit(ToyModule(), toy_loader(toy_dataset()), ckpt_path=tmp_path / "final.ckpt")


def test_a_checkpoint_without_save_last_gets_a_final_checkpoint(tmp_path):
    module = ToyModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=3, local_steps=2),
        callbacks=[ParaBlockCallback(staleness=1), checkpoint],
        max_epochs=3,
        enable_checkpointing=True,
    )
    trainer.fit(module, toy_loader(toy_dataset()))
    final = torch.load(tmp_path / "final.ckpt", weights_only=True)
    for name, param in module.state_dict().items():
        assert torch.equal(final["state_dict"][name], param), name


STUCK_RUN = textwrap.dedent(
    """
    import threading
    from helpers import quiet_trainer
    from lightning_parablock import Aggregator, FederatedBlockStrategy, ParaBlockCallback
    from toy import ToyModule, toy_dataset, toy_loader

    class NeverReturns(Aggregator):
        def __call__(self, deltas, weights):
            threading.Event().wait()  # a user aggregator that hangs

    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=2, local_steps=1),
        callbacks=[ParaBlockCallback(staleness=1, aggregator=NeverReturns(), comm_timeout=1.5)],
        max_epochs=3,
    )
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    """
)


@pytest.mark.slow
def test_a_stuck_exchange_ends_the_process_within_the_timeout(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_RUN)
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode != 0
    assert "did not finish within comm_timeout=1.5s" in result.stderr, result.stderr[-2000:]
    # Import and start-up take most of it; the process does not wait for the stuck thread at exit.
    assert time.monotonic() - started < 200


class NoOptimizerModule(ToyModule):
    configure_optimizers = LightningModule.configure_optimizers  # the user's module never defined one


def test_client_optimizer_serves_a_module_without_configure_optimizers():
    module = NoOptimizerModule()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=2, local_steps=2, client_optimizer=lambda p: torch.optim.SGD(p, lr=0.1)),
        callbacks=[ParaBlockCallback(staleness=1)],
        max_epochs=2,
    )
    trainer.fit(module, toy_loader(toy_dataset()))
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters())


def test_fast_dev_run_is_refused_with_a_message_about_fast_dev_run():
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=2, local_steps=1), callbacks=[ParaBlockCallback()], fast_dev_run=True
    )
    with pytest.raises(MisconfigurationException, match=r"`fast_dev_run=True` runs a single batch.*max_epochs=2"):
        trainer.fit(ToyModule(), toy_loader(toy_dataset()))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(accumulate_grad_batches=0, max_epochs=2), r"`accumulate_grad_batches=0` would train nothing"),
        (dict(max_epochs=0), r"`max_epochs=0` would train nothing"),
        (dict(max_epochs=2, max_steps=0), r"`max_steps=0` would train nothing"),
    ],
)
def test_trainer_settings_that_train_nothing_are_refused(settings, message):
    trainer = quiet_trainer(strategy=FederatedBlockStrategy(num_clients=2, local_steps=1), callbacks=[ParaBlockCallback(staleness=0)], **settings)
    with pytest.raises(MisconfigurationException, match=message):
        trainer.fit(ToyModule(), toy_loader(toy_dataset()))
