"""Every private Lightning, torch and library symbol this package relies on, reached from here only.

Lightning, torch and ``datasets`` may rename or drop a private name in any release. With each one imported or
named here, and ``tests/test_compat.py`` checking that it still exists in the pinned versions, an upgrade fails
one clear test instead of silently doing nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch.distributed as dist
from lightning.fabric.strategies import _StrategyRegistry as StrategyRegistryType
from lightning.fabric.utilities.optimizer import _optimizers_to_device as optimizers_to_device
from lightning.fabric.utilities.types import _DEVICE as Device
from lightning.fabric.utilities.types import _PATH as PathLike
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.cli import _InstantiatorFn as InstantiatorFn
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers as init_optimizers_and_lr_schedulers
from lightning.pytorch.overrides.distributed import _sync_module_states as sync_module_states
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher as MultiProcessingLauncher

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from datasets import Dataset
    from lightning.fabric.plugins import ClusterEnvironment
    from lightning.pytorch.callbacks import Checkpoint

__all__ = [
    "Device", "InstantiatorFn", "MultiProcessingLauncher", "PathLike", "StrategyRegistryType",
    "init_optimizers_and_lr_schedulers", "optimizers_to_device", "sync_module_states",
]  # fmt: skip

SIGTERM_NOTIFIER = "_sigterm_notifier_fn"
"""``_SignalConnector``'s SIGTERM handler, read when it registers its handlers (replaced per fit by preemption)."""
SLURM_REQUEUE_HANDLER = "_slurm_sigusr_handler_fn"
"""``_SignalConnector``'s SLURM auto-requeue handler, read at the same time."""
SIGTERM_LOOP_CHECK = "_broadcast_sigterm_tensor"
"""``_TrainingEpochLoop``'s per-batch SIGTERM broadcast on the default group."""

OVERRIDDEN: dict[type, tuple[str, ...]] = {
    DDPStrategy: ("_configure_launcher",),  # one process: no launcher, so notebooks keep working
    LightningCLI: ("_parse_ckpt_path",),  # the config stands; a checkpoint of another model is refused by name
}
"""Private methods this package overrides: each must still exist on the class, or the override does nothing."""


def attached_trainer(module: pl.LightningModule) -> Optional[pl.Trainer]:
    """The Trainer ``module`` is attached to, or ``None`` (``module.trainer`` raises when there is none)."""
    return module._trainer


def signal_connector(trainer: pl.Trainer) -> Any:
    """The Trainer's ``_SignalConnector``: where SIGTERM and SLURM's requeue signal are handled."""
    return trainer._signal_connector


def cluster_environment(trainer: pl.Trainer) -> ClusterEnvironment:
    """The cluster environment the Trainer resolved (SLURM, torchrun, ...)."""
    return trainer._accelerator_connector.cluster_environment


def saves_within_epoch(checkpoint: Checkpoint) -> bool:
    """A ModelCheckpoint set to save every n training steps or after a time interval: inside a round."""
    return bool(getattr(checkpoint, "_every_n_train_steps", 0) or getattr(checkpoint, "_train_time_interval", None))


def progress_bar_metrics(trainer: pl.Trainer) -> dict[str, Any]:
    """The dict the progress bar reads. Lightning 2.6 hands back its own dict and only ever updates it."""
    return trainer.progress_bar_metrics


def default_store() -> dist.Store:
    """The key-value store of the default process group (the job's rendezvous store)."""
    return dist.distributed_c10d._get_default_store()


def is_a_rank(trainer: pl.Trainer) -> bool:
    """Whether this process trains as one of the ranks: one process, ``popen`` (the launching process is rank 0),
    or torchrun/SLURM; not the parent that ``start_method="spawn"/"fork"/"forkserver"`` starts the ranks from."""
    return not isinstance(trainer.strategy.launcher, MultiProcessingLauncher)


def dataset_source_row(dataset: Dataset, row: int) -> int:
    """The row of the table ``dataset`` was selected, shuffled or split from that its ``row`` is: the row of the
    file as loaded, for an error to name."""
    indices = dataset._indices
    return row if indices is None else int(indices.column(0)[row].as_py())


def dataset_fingerprint(dataset: Dataset) -> str:
    """The fingerprint ``datasets`` caches ``dataset`` under; tokenizing keys its own cache entry on it."""
    return dataset._fingerprint
