"""A run stopped at a round boundary resumes to the same final model as an uninterrupted one."""

import pytest
import torch
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from helpers import quiet_trainer
from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback
from toy import ToyModule, toy_dataset, toy_loader


class Crash(Callback):
    def __init__(self, at_round):
        self.at_round = at_round

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at_round:
            raise RuntimeError("simulated crash")


def run(tmp_path, staleness, callbacks=(), ckpt_path=None, num_clients=3, layers_per_block=1, optimizer_state="reset"):
    module = ToyModule(optimizer="adamw")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1, save_top_k=-1)
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
    )
    trainer.fit(module, toy_loader(toy_dataset()), ckpt_path=ckpt_path, weights_only=ckpt_path is not None)
    return module, trainer


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


def test_checkpoint_in_the_middle_of_a_round_is_refused(tmp_path):
    module = ToyModule()
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=3, local_steps=2),
        callbacks=[ParaBlockCallback(), ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1)],
        max_epochs=2,
        enable_checkpointing=True,
    )
    with pytest.raises(MisconfigurationException, match="middle of round 0"):
        trainer.fit(module, toy_loader(toy_dataset()))


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
