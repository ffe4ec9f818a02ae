"""Progress a fine-tuner can read: every client's loss at every optimizer step in the loggers (whatever
``log_every_n_steps`` says), one line at fit start that says what a round trains and how many passes over the data
the run makes, a budget in passes (``parablock fit --passes``), and none of the noise the library can avoid."""

import csv
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer, tiny_recipe_args
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.data import has_len_all_ranks
from toy import ToyModule, toy_dataset, toy_loader, toy_loss

from lightning_parablock import CausalLMModule, FederatedBlockStrategy, ParaBlockCallback
from lightning_parablock.cli import main
from lightning_parablock.cli.noise import quiet_dependency_noise
from lightning_parablock.data.federated import NoEvaluationData
from lightning_parablock.strategies.run_outline import RunOutline
from lightning_parablock.telemetry.timeline import TIMELINE_FILENAME, load_timeline


class RawLosses(ToyModule):
    """Records (client, Trainer step, raw loss) of every micro-batch."""

    def __init__(self):
        super().__init__(optimizer="adamw")
        self.seen = []

    def training_step(self, batch, batch_idx):
        loss = toy_loss(self, batch)
        self.seen.append((self.trainer.strategy.active_client, self.trainer.global_step, loss.item()))
        self.log("train_loss", loss)
        return loss


def fit_logged(tmp_path, accumulate=1, **trainer_kwargs):
    module = RawLosses()
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=3, local_steps=2, clients_per_round=2),
        callbacks=[ParaBlockCallback(staleness=1)],
        max_epochs=3,
        accumulate_grad_batches=accumulate,
        logger=CSVLogger(tmp_path, name="logs"),
        **trainer_kwargs,
    )
    trainer.fit(module, toy_loader(toy_dataset()))
    with open(Path(trainer.log_dir) / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    return module, trainer, rows


def client_rows(rows):
    """(client, step, round) -> loss of every per-client row."""
    found = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("parablock/train_loss/client_") and value:
                found[(int(key.rsplit("_", 1)[1]), int(row["step"]), int(float(row["epoch"])))] = float(value)
    return found


@pytest.mark.parametrize("accumulate", [1, 2])
def test_every_clients_loss_at_every_optimizer_step_reaches_the_loggers(tmp_path, accumulate):
    module, trainer, rows = fit_logged(tmp_path, accumulate)  # log_every_n_steps stays Lightning's 50
    logged = client_rows(rows)
    assert len(logged) == 3 * 2 * 2  # rounds × participants × local steps
    expected = {}
    for client, step_after, loss in module.seen:  # the micro-batches of one optimizer step share its step
        expected.setdefault((client, step_after), []).append(loss)
    steps = sorted({s for _, s, _ in module.seen})
    by_step = {(c, s): sum(v) / len(v) for (c, s), v in expected.items() if len(v) == accumulate}
    assert {(c, s): v for (c, s, _), v in logged.items()} == pytest.approx(by_step)
    assert sorted({s for _, s, _ in logged}) == steps[: 3 * 2 * 2]  # one Trainer step per optimizer step
    rounds = {r for *_, r in logged}
    assert rounds == {0, 1, 2}


def test_the_client_rows_sit_at_the_steps_lightning_logs_the_modules_metrics(tmp_path):
    _, _, rows = fit_logged(tmp_path, log_every_n_steps=1)
    module_loss = {int(r["step"]): float(r["train_loss"]) for r in rows if r.get("train_loss")}
    for (_, step, _), loss in client_rows(rows).items():
        assert module_loss[step] == pytest.approx(loss)  # without accumulation the step's loss is the batch's


def test_the_timeline_keeps_every_clients_step_losses(tmp_path):
    _, trainer, _ = fit_logged(tmp_path)
    _, records = load_timeline(Path(trainer.log_dir) / TIMELINE_FILENAME)
    trained = [r for r in records if not r.flush]
    assert [sorted(r.client_step_loss) for r in trained] == [sorted(r.participants) for r in trained]
    assert all(len(steps) == 2 for r in trained for steps in r.client_step_loss.values())
    first = trained[0]
    for client, losses in first.client_step_loss.items():
        assert sum(losses.values()) / 2 == pytest.approx(first.client_loss[client])


# -------------------------------------------------------------------------------------------- the outline


def test_fit_start_says_what_a_round_trains_and_how_many_passes_the_run_makes(caplog):
    caplog.set_level(logging.INFO)
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=3, local_steps=2, clients_per_round=2),
        callbacks=[ParaBlockCallback(staleness=1)],
        max_epochs=3,
        accumulate_grad_batches=2,
    )
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ParaBlock: a round")]
    assert line == (
        "ParaBlock: a round trains 1 of 4 blocks (72 parameters, 21.4% of the model's 337) on 2 of 3 clients × 2 local"
        " steps × batch 4 × accumulation 2 = 32 samples. 3 rounds (one epoch is one round) read the 48 training"
        " samples 2.00 times."
    )


def test_the_outline_names_uneven_blocks_an_open_end_and_a_resume():
    outline = RunOutline([1_200_000, 30_400_000, 31_000_000], 1_240_000_000, 10, 10, 50, 4, 1, 20_000, None)
    assert "(1.2 M to 31 M parameters, 1.7% of the model's 1.24 B)" in outline.format()
    assert outline.format().endswith("The run has no set end (max_epochs and max_steps are unlimited).")
    resumed = RunOutline([10], 40, 1, 4, 8, 2, 1, 64, rounds=12, first_round=5)
    assert "1 of 1 block (10 parameters" in resumed.format()
    expected = "12 rounds (one epoch is one round, resumed at round 6) read the 64 training samples 3.00 times"
    assert expected in resumed.format()


# ------------------------------------------------------------------------------------------------ noise


def test_the_clis_filters_catch_the_dependencys_noise_and_never_a_users_own_warning(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_dependency_noise()
        for module in ("lightning.pytorch.utilities._pytree", "my_training_script"):
            warnings.warn_explicit(
                "`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, "x.py", 1, module=module
            )
        warnings.warn_explicit(
            "The number of training batches (8) is smaller than the logging interval Trainer(log_every_n_steps=50).",
            UserWarning, "fit_loop.py", 1, module="lightning.pytorch.loops.fit_loop",
        )  # fmt: skip
    assert [w.filename for w in caught] == ["x.py"] and caught[0].category is FutureWarning  # the user's is kept
    caplog.set_level(logging.INFO)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
    rank_zero.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_no_validation_set_is_not_reported_as_a_loader_of_zero_length():
    strategy = SingleDeviceStrategy(device=torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        has_len_all_ranks(NoEvaluationData(), strategy)
        has_len_all_ranks([], strategy)  # anybody else's empty list still gets Lightning's warning
    assert [str(w.message) for w in caught] == [
        "Total length of `list` across ranks is zero. Please make sure this was your intention."
    ]
    assert NoEvaluationData() == []


def test_adding_lora_raises_no_deprecation_from_the_calls_the_library_makes():
    module = CausalLMModule(
        config={"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2},
        lora={"r": 2},
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.configure_model()
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []


NOISE = ("💡 Tip", "LeafSpec", "Total length of", "log_every_n_steps", "is_gradient_checkpointing", "FutureWarning")


@pytest.mark.slow
def test_a_chat_fit_without_validation_prints_the_run_and_no_dependency_noise(tmp_path):
    from pretrained import save_tiny_checkpoint
    from test_finetune_recipe import recipe_args

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny_chat", torch.float32)
    args = recipe_args(tmp_path, checkpoint, "--output_dir", "null", "--data.init_args.val_fraction", "0",
                       "--trainer.logger", "true", "--trainer.enable_checkpointing", "true",
                       "--method", "fedit", "--trainer.callbacks.init_args.staleness", "0")  # fmt: skip
    script = "import sys; from lightning_parablock.cli import main; main(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=280,
        env={**os.environ, "PYTHONWARNINGS": ""}, cwd=tmp_path,
    )  # fmt: skip
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    assert "ParaBlock: a round trains 1 of 1 block" in text and "read the 40 training samples" in text
    assert [word for word in NOISE if word in text] == [], text


# ----------------------------------------------------------------------------------------------- --passes


def test_passes_sets_the_rounds_from_the_data_size(tmp_path, capfd):
    # 64 samples, 10 clients × 1 local step × batch 16 = 160 per round: 5 passes are 2 rounds
    main(["fit", *tiny_recipe_args(tmp_path, "--trainer.strategy.init_args.local_steps", "1", "--passes", "5")])
    captured = capfd.readouterr()
    assert "parablock: --passes 5 over 64 training samples at 160 per round: trainer.max_epochs=2 (5.00 passes)" in (
        captured.err
    )
    assert "rounds: 2 " in captured.out
    saved = json.loads(next((tmp_path / "run").rglob(TIMELINE_FILENAME)).read_text())
    assert len([r for r in saved["records"] if not r["flush"]]) == 2


def test_passes_and_max_steps_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_recipe_args(tmp_path, "--trainer.max_steps", "5", "--passes", "2")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "`--passes 2.0` sets the run's length, and so does `trainer.max_steps=5`" in err
