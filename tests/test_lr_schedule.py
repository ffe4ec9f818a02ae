"""The clients' learning-rate schedule follows the federation's progress: step k of a turn in round t trains at the
factor of position t × local_steps + k for every client, scales each param group's own initial rate without ever
compounding, agrees with the plain-PyTorch reference, is what a LearningRateMonitor logs, and resumes bit for bit
with nothing saved for it."""

import math

import pytest
import torch
from helpers import lightning_and_reference, max_abs_diff, quiet_trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback
from lightning_parablock.core.lr_schedule import LearningRateSchedule
from lightning_parablock.core.run_length import rounds_for_passes, rounds_in_run
from lightning_parablock.strategies.run_settings import check_same_settings


def cosine_after_warmup(position: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """The schedule written out on its own, for the reference loop and the expectations."""
    if position < warmup:
        return (position + 1) / warmup
    progress = (position - warmup) / (total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------- the function


def test_warmup_then_cosine_or_linear_decay_to_the_floor():
    cosine = LearningRateSchedule("cosine", warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    assert [cosine.factor(p) for p in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert cosine.factor(12) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert cosine.factor(19) > 0.1 and cosine.factor(20) == pytest.approx(0.1)
    assert cosine.factor(50) == pytest.approx(0.1)
    linear = LearningRateSchedule("linear", total_steps=10)
    assert [linear.factor(p) for p in (0, 5, 10)] == [1.0, 0.5, 0.0]
    constant = LearningRateSchedule("constant", warmup_steps=2)
    assert [constant.factor(p) for p in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert not LearningRateSchedule().changes_lr and constant.changes_lr


def test_each_param_group_is_scaled_from_its_own_initial_rate_never_compounding():
    weight, bias = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [weight], "lr": 0.1}, {"params": [bias], "lr": 0.01}])
    schedule = LearningRateSchedule("linear", total_steps=4)
    for position in (2, 2, 1, 3):
        schedule.apply(optimizer, position)
        expected = [base * (1 - position / 4) for base in (0.1, 0.01)]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.1, 0.01]


def test_a_tensor_learning_rate_is_filled_in_place_and_its_initial_value_kept_apart():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([param], lr=torch.tensor(0.5))
    lr = optimizer.param_groups[0]["lr"]
    LearningRateSchedule("constant", warmup_steps=2).apply(optimizer, 0)
    assert optimizer.param_groups[0]["lr"] is lr and float(lr) == 0.25
    assert float(optimizer.param_groups[0]["initial_lr"]) == 0.5


def test_the_run_length_comes_from_max_epochs_or_max_steps():
    steps = lambda t: 4 if t % 2 else 2  # noqa: E731 (a process's turns vary by round with several processes)
    assert rounds_in_run(5, -1, steps) == 5
    assert rounds_in_run(-1, 7, steps) == 3  # 2 + 4 + 2 steps: the third round holds step 7
    assert rounds_in_run(2, 100, steps) == 2
    assert rounds_in_run(-1, -1, steps) is None
    assert rounds_for_passes(2, num_samples=100, samples_per_round=30) == 7  # 6.67 rounds, rounded up
    assert rounds_for_passes(0.6, num_samples=100, samples_per_round=30) == 2


# --------------------------------------------------------------------------------- in a federated fit


class RecordingModule(ToyModule):
    """Two param groups with their own rates; each micro-batch records (round, client, micro-batch, rates)."""

    def __init__(self, optimizer="sgd"):
        super().__init__(optimizer=optimizer)
        self.used = []

    def configure_optimizers(self):
        weights = [p for n, p in self.named_parameters() if p.requires_grad and n.endswith("weight")]
        biases = [p for n, p in self.named_parameters() if p.requires_grad and n.endswith("bias")]
        return torch.optim.SGD([{"params": weights, "lr": 0.1}, {"params": biases, "lr": 0.01}], momentum=0.5)

    def training_step(self, batch, batch_idx):
        strategy = self.trainer.strategy
        groups = self.trainer.optimizers[0].param_groups
        self.used.append((self.current_epoch, strategy.active_client, batch_idx, [g["lr"] for g in groups]))
        return super().training_step(batch, batch_idx)


def fit_recording(optimizer_state="reset", accumulate=1, rounds=4, **lr_options):
    module = RecordingModule()
    strategy = FederatedBlockStrategy(
        num_clients=3, local_steps=2, clients_per_round=2, optimizer_state=optimizer_state, layers_per_block=2,
        **lr_options,
    )
    trainer = quiet_trainer(
        strategy=strategy,
        callbacks=[ParaBlockCallback(staleness=1)],
        max_epochs=rounds,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, toy_loader(toy_dataset()))
    return module, strategy


@pytest.mark.parametrize("optimizer_state", ["reset", "per_block"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_every_client_trains_at_the_rate_of_its_point_in_the_run(optimizer_state, accumulate):
    schedule = dict(lr_schedule="cosine", warmup_steps=3, min_lr_ratio=0.1)
    module, strategy = fit_recording(optimizer_state, accumulate, **schedule)
    assert strategy.lr_schedule.total_steps == 4 * 2
    per_turn = 2 * accumulate
    for round_index, client, batch_idx, rates in module.used:
        step = (batch_idx % per_turn) // accumulate  # the optimizer step of the turn this micro-batch belongs to
        factor = cosine_after_warmup(round_index * 2 + step, warmup=3, total=8, floor=0.1)
        assert rates == pytest.approx([0.1 * factor, 0.01 * factor]), (round_index, client, batch_idx)
    clients_per_round = {(r, c) for r, c, _, _ in module.used}
    assert len(clients_per_round) == 4 * 2  # two clients in each of four rounds, both scheduled alike
    if optimizer_state == "per_block":  # a kept optimizer came back to its block, rescaled from its initial rate
        assert len(strategy.federation.kept_optimizers) < len(clients_per_round)


def test_the_default_schedule_leaves_the_optimizers_rate_alone():
    module, strategy = fit_recording()
    assert {tuple(rates) for *_, rates in module.used} == {(0.1, 0.01)}
    assert not strategy.lr_schedule.changes_lr


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_cosine_with_warmup_matches_the_reference_loop(optimizer):
    module, reference, strategy, _ = lightning_and_reference(
        staleness=1,
        num_clients=3,
        optimizer=optimizer,
        rounds=4,
        local_steps=2,
        accumulate=2,
        clients_per_round=2,
        lr_options=dict(lr_schedule="cosine", warmup_steps=3, min_lr_ratio=0.1),
        lr_factor=lambda position: cosine_after_warmup(position, warmup=3, total=8, floor=0.1),
    )
    assert strategy.lr_schedule.total_steps == 8
    assert max_abs_diff(module, reference.global_model) <= 1e-6
    constant, _, _, _ = lightning_and_reference(1, 3, optimizer, rounds=4, accumulate=2, clients_per_round=2)
    assert max_abs_diff(module, constant) > 1e-4  # the schedule changed the run


def test_a_learning_rate_monitor_after_the_callback_logs_the_rate_each_step_used(tmp_path):
    class OneGroup(ToyModule):
        used = []

        def training_step(self, batch, batch_idx):
            self.used.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            return super().training_step(batch, batch_idx)

    module, monitor = OneGroup(), LearningRateMonitor(logging_interval="step")
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=3, local_steps=2, lr_schedule="linear", warmup_ratio=0.25),
        callbacks=[ParaBlockCallback(staleness=1), monitor],
        max_epochs=3,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    trainer.fit(module, toy_loader(toy_dataset()))
    (logged,) = monitor.lrs.values()
    assert logged == module.used and len(set(logged)) > 3
    assert trainer.strategy.lr_schedule.warmup_steps == 2  # ceil(0.25 × 3 rounds × 2 local steps)


def test_a_learning_rate_monitor_per_epoch_logs_the_rate_of_the_rounds_first_step(tmp_path):
    monitor = LearningRateMonitor(logging_interval="epoch")
    strategy = FederatedBlockStrategy(num_clients=2, local_steps=2, lr_schedule="linear", optimizer_state="per_block")
    trainer = quiet_trainer(
        strategy=strategy, callbacks=[ParaBlockCallback(staleness=1), monitor], max_epochs=3, logger=CSVLogger(tmp_path)
    )
    trainer.fit(ToyModule(), toy_loader(toy_dataset()))
    (logged,) = monitor.lrs.values()
    assert logged == pytest.approx([0.05 * (1 - 2 * t / 6) for t in range(3)])  # position t × local_steps


def test_max_steps_sets_the_length_a_decaying_schedule_spans():
    module = ToyModule()
    strategy = FederatedBlockStrategy(num_clients=3, local_steps=2, lr_schedule="cosine")
    trainer = quiet_trainer(strategy=strategy, callbacks=[ParaBlockCallback(staleness=1)], max_epochs=-1, max_steps=13)
    trainer.fit(module, toy_loader(toy_dataset()))
    assert strategy.lr_schedule.total_steps == 3 * 2  # 6 steps per round for one process: the 3rd holds step 13


# ------------------------------------------------------------------------------------------------ resume


def fit_with_checkpoints(folder, optimizer_state, ckpt_path=None, max_epochs=5, crash_at=None, **lr_options):
    class Crash(ModelCheckpoint):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == crash_at:
                raise RuntimeError("simulated crash")

    module = ToyModule(optimizer="adamw")
    options = dict(lr_schedule="cosine", warmup_steps=3, min_lr_ratio=0.1) | lr_options
    strategy = FederatedBlockStrategy(
        num_clients=3, local_steps=2, clients_per_round=2, optimizer_state=optimizer_state, **options
    )
    trainer = quiet_trainer(
        strategy=strategy,
        callbacks=[
            ParaBlockCallback(staleness=1),
            Crash(dirpath=folder, save_last=True, every_n_epochs=1, save_top_k=-1),
        ],
        max_epochs=max_epochs,
        enable_checkpointing=True,
    )
    trainer.fit(module, toy_loader(toy_dataset()), ckpt_path=ckpt_path, weights_only=ckpt_path is not None)
    return module


@pytest.mark.parametrize("optimizer_state", ["reset", "per_block"])
def test_a_resumed_run_with_a_schedule_is_bit_identical(tmp_path, optimizer_state):
    uninterrupted = fit_with_checkpoints(tmp_path / "a", optimizer_state)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_with_checkpoints(tmp_path / "b", optimizer_state, crash_at=3)
    resumed = fit_with_checkpoints(tmp_path / "b", optimizer_state, ckpt_path="last")
    for (name, a), b in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(max_epochs=7), "lr_schedule_steps: 10 in the checkpoint, 14 now"),
        (dict(lr_schedule="linear"), "lr_schedule: 'cosine' in the checkpoint, 'linear' now"),
        (dict(warmup_steps=1), "warmup_steps: 3 in the checkpoint, 1 now"),
    ],
)
def test_a_resume_that_would_change_the_schedule_is_refused_by_name(tmp_path, change, named):
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_with_checkpoints(tmp_path, "reset", crash_at=2)  # 5 rounds planned, 2 done
    with pytest.raises(MisconfigurationException, match="belongs to another run") as error:
        fit_with_checkpoints(tmp_path / "again", "reset", ckpt_path=tmp_path / "last.ckpt", **change)
    assert named in str(error.value)
    assert str(error.value).count(" in the checkpoint, ") == 1  # nothing else differs


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(lr_schedule="exponential"), "`lr_schedule` must be 'constant', 'linear' or 'cosine', got 'exponential'"),
        (dict(warmup_steps=-1), "`warmup_steps` must be an integer >= 0, got -1"),
        (dict(warmup_ratio=1.0), "`warmup_ratio` must be in [0, 1), got 1.0"),
        (dict(warmup_steps=2, warmup_ratio=0.1), "as `warmup_steps` or as `warmup_ratio`, not both"),
        (dict(min_lr_ratio=0.1), "does not apply to lr_schedule='constant'"),
        (dict(lr_schedule="cosine", min_lr_ratio=1.5), "`min_lr_ratio` must be in [0, 1], got 1.5"),
    ],
)
def test_bad_schedule_options_are_refused_when_the_strategy_is_built(options, message):
    with pytest.raises(ValueError) as error:
        FederatedBlockStrategy(**options)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("options", "limits", "message"),
    [
        (dict(lr_schedule="cosine"), dict(max_epochs=-1), "`lr_schedule='cosine'` needs the run's length"),
        (dict(warmup_ratio=0.1), dict(max_epochs=-1), "`warmup_ratio` needs the run's length"),
        (dict(warmup_steps=4), dict(max_epochs=2), "The warmup (4 local steps) is not shorter than the run (4"),
    ],
)
def test_a_schedule_the_run_cannot_hold_is_refused_before_the_first_step(options, limits, message):
    module = ToyModule()
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=2, local_steps=2, **options),
        callbacks=[ParaBlockCallback(staleness=1)],
        **limits,
    )
    with pytest.raises(ValueError) as error:
        trainer.fit(module, toy_loader(toy_dataset()))
    assert message in str(error.value)
    assert trainer.global_step == 0


def test_an_lr_scheduler_from_configure_optimizers_is_refused_naming_the_strategys_schedule():
    class WithScheduler(ToyModule):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1)]

    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=2, local_steps=1),
        callbacks=[ParaBlockCallback(staleness=1)],
        max_epochs=2,
    )
    with pytest.raises(MisconfigurationException, match=r"FederatedBlockStrategy\(lr_schedule='cosine', warmup_steps="):
        trainer.fit(WithScheduler(), toy_loader(toy_dataset()))


def test_rounds_for_passes_counts_what_every_round_reads():
    strategy = FederatedBlockStrategy(num_clients=10, local_steps=8, clients_per_round=5)
    assert strategy.samples_per_round(batch_size=4, accumulate_grad_batches=2) == 5 * 8 * 4 * 2
    assert strategy.rounds_for_passes(2, num_samples=1000, batch_size=4, accumulate_grad_batches=2) == 7  # 6.25
    with pytest.raises(ValueError, match="`passes` must be > 0"):
        strategy.rounds_for_passes(0, num_samples=1000, batch_size=4)


def test_a_checkpoint_from_before_schedules_counts_as_constant():
    saved = {"local_steps": 2, "seed": 0}  # settings recorded before the learning-rate schedule was
    check_same_settings(saved, {"local_steps": 2, "lr_schedule": "constant", "warmup_steps": 0}, "old.ckpt")
    with pytest.raises(MisconfigurationException, match="lr_schedule: 'constant' in the checkpoint, 'cosine' now"):
        check_same_settings(saved, {"local_steps": 2, "lr_schedule": "cosine"}, "old.ckpt")


def test_parablocks_lr_scheduler_flag_is_refused_naming_the_strategys_options(capsys):
    from lightning_parablock.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--lr_scheduler", "StepLR"])
    assert exit_info.value.code == 2
    assert "--trainer.strategy.init_args.lr_schedule cosine" in capsys.readouterr().err
