"""The Trainer settings a federated fit refuses, in one place: the strategy, the callback and ``parablock fit``.

One epoch is one federated round (every participant's turn, then an exchange), so settings that cut an epoch
short, validate inside it or train nothing are refused before anything trains. A half precision that this CPU
only emulates is warned about (it runs, several times slower than fp32). ``option_prefix`` names the
settings the way the user gave them: ``""`` for the Trainer's arguments, ``"--trainer."`` on the command line.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Optional, Union

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import LearningRateFinder
from lightning.pytorch.plugins.precision import DoublePrecision
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_parablock._compat import saves_within_epoch
from lightning_parablock.core.cpu_half import missing_half_instructions

if TYPE_CHECKING:
    import lightning.pytorch as pl


COMPUTE_DTYPES = {
    "bf16-true": torch.bfloat16,
    "bf16-mixed": torch.bfloat16,
    "16-true": torch.float16,
    "16-mixed": torch.float16,
}
"""Trainer precision -> the half precision its matrix products run in."""


class TrainerSettingError(MisconfigurationException, ValueError):
    """A Trainer setting under which a federated fit cannot run as asked."""


class EmulatedPrecisionWarning(UserWarning):
    """The Trainer computes in a half precision that this CPU has no instructions for."""


def check_trainer(trainer: "pl.Trainer", option_prefix: str = "") -> None:
    """Refuse settings under which no round would run, or rounds would be cut or interrupted; warn about a half
    precision this CPU only emulates."""
    option = lambda name: f"`{option_prefix}{name}={getattr(trainer, name)}`"  # noqa: E731
    if trainer.fast_dev_run:
        two_short_rounds = (
            "`--trainer.max_epochs 2 --trainer.strategy.init_args.local_steps 1 --trainer.limit_val_batches 1`"
            if option_prefix == "--trainer."
            else "`max_epochs=2` and `limit_val_batches=1`, with `local_steps=1` on the strategy"
        )
        raise TrainerSettingError(
            f"{option('fast_dev_run')} runs a single batch of a single epoch, which is not a federated round (every"
            f" client's turn, then an exchange). For a quick check run two short rounds instead: {two_short_rounds}."
        )
    trains_nothing = {
        "accumulate_grad_batches": trainer.accumulate_grad_batches < 1,
        "max_epochs": trainer.max_epochs == 0,
        "max_steps": trainer.max_steps == 0,
        "limit_train_batches": trainer.limit_train_batches == 0,
    }
    for name, nothing in trains_nothing.items():
        if nothing:
            raise TrainerSettingError(f"{option(name)} would train nothing; give it a positive value.")
    if not _is_whole_epoch(trainer.limit_train_batches):
        raise TrainerSettingError(
            f"{option('limit_train_batches')} would cut rounds short: one epoch is one federated round. Leave it"
            " at 1.0 and set `local_steps` on the strategy instead."
        )
    if not _is_whole_epoch(trainer.val_check_interval):
        raise TrainerSettingError(
            f"{option('val_check_interval')} would validate in the middle of a client's turn. Validate at round"
            f" ends with `{option_prefix}check_val_every_n_epoch` instead."
        )
    for tuner in (c for c in trainer.callbacks if isinstance(c, LearningRateFinder)):  # Lightning refuses
        raise TrainerSettingError(  # BatchSizeFinder under any DDP strategy itself
            f"{type(tuner).__name__} runs training loops of its own when fit starts, before the federation's first"
            " round: its steps would train clients outside any round and its checkpoint would be saved mid-round."
            " Tune on a plain Trainer first, then fit federated with the value it found."
        )
    for checkpoint in trainer.checkpoint_callbacks:
        if saves_within_epoch(checkpoint):
            raise TrainerSettingError(
                f"{type(checkpoint).__name__} saves every n training steps or after a time interval, which lands"
                " inside a federated round that Lightning cannot resume consistently. Save at round"
                " boundaries with `every_n_epochs` (one epoch is one round)."
            )
    warn_emulated_half_precision(trainer, option_prefix)


def warn_emulated_half_precision(trainer: "pl.Trainer", option_prefix: str = "") -> Optional[str]:
    """Warn when the Trainer computes on the CPU in a half precision the CPU has no instructions for; the warning.

    Nothing fails in that case: PyTorch converts through fp32 and every step takes several times what an fp32
    step takes, so a first round that looks hung is the only sign without this warning.
    """
    precision = str(trainer.precision)
    dtype = COMPUTE_DTYPES.get(precision)
    if dtype is None or not isinstance(trainer.accelerator, CPUAccelerator):
        return None
    missing = missing_half_instructions(dtype)
    if missing is None:
        return None
    name = str(dtype).removeprefix("torch.")
    fix = (
        "`--trainer.precision 32-true` (and `--model.init_args.dtype auto` where the config loads weights in"
        f" {name})"
        if option_prefix == "--trainer."
        else f"`precision='32-true'` (and `CausalLMModule(dtype='auto')` where the model is loaded in {name})"
    )
    message = (
        f"`{option_prefix}precision={precision}` computes in {name} on the CPU, but this CPU has no {name}"
        f" instructions ({' or '.join(missing)}, missing from /proc/cpuinfo): PyTorch emulates them and every"
        f" step takes several times an fp32 one (README, Troubleshooting). On this CPU train with {fix}."
    )
    _warn_once(message)
    return message


@rank_zero_only
def _warn_once(message: str) -> None:
    """One place of issue, so Python shows the same warning once per process (the CLI checks before the callback)."""
    warnings.warn(message, EmulatedPrecisionWarning, stacklevel=1)


def check_staleness(trainer: "pl.Trainer", staleness: int) -> None:
    """An exchange must overlap training: fewer rounds than the staleness would only flush."""
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs > 0 and staleness >= max_epochs:
        raise TrainerSettingError(
            f"`staleness={staleness}` is not below the number of rounds (max_epochs={max_epochs}):"
            f" no exchange would overlap training. Use a staleness from 0 to {max_epochs - 1}."
        )


def check_module_and_precision(trainer: "pl.Trainer", module: "pl.LightningModule") -> None:
    """Automatic optimization hands each client's optimizer to Lightning's loop; deltas are fp32."""
    if not module.automatic_optimization:
        raise TrainerSettingError(
            "FederatedBlockStrategy needs automatic optimization: it hands each client's optimizer to"
            " Lightning's loop. Set `self.automatic_optimization = True` in your LightningModule."
        )
    if isinstance(trainer.precision_plugin, DoublePrecision):
        raise TrainerSettingError(
            f"`precision={trainer.precision!r}` is not supported: deltas, their exchange and the aggregate are"
            " kept in fp32, which would silently drop fp64 weights' precision. Use '32-true', 'bf16-true',"
            " 'bf16-mixed', '16-true' or '16-mixed'."
        )


def check_turn_plan(trainer: "pl.Trainer", round_index: Optional[int], planned_batches_per_turn: int) -> None:
    """At a round's first batch: a round is in progress (the callback began it) and each turn is still as long as
    it was planned (a ``GradientAccumulationScheduler`` has had its say by now)."""
    if round_index is None:
        raise TrainerSettingError(
            "FederatedBlockStrategy has no round in progress: add `ParaBlockCallback(...)` to the Trainer's"
            " callbacks; it begins and ends every round."
        )
    strategy = trainer.strategy
    if strategy.batches_per_turn != planned_batches_per_turn:
        raise TrainerSettingError(
            f"`accumulate_grad_batches` changed to {trainer.accumulate_grad_batches} during training (round"
            f" {round_index}); each client's turn was planned for {planned_batches_per_turn} batches. Keep the"
            " accumulation fixed for the whole run."
        )


def _is_whole_epoch(value: Union[int, float]) -> bool:
    """``1.0`` (a float) means the whole epoch; the integer ``1`` means one batch."""
    return isinstance(value, float) and value == 1.0
