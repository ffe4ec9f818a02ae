"""``final.ckpt``: the run's final global model, written beside each checkpoint folder after the flush.

The last round's checkpoint (``last.ckpt`` of ``ModelCheckpoint(save_last=True)``, or the per-round file) holds
the state at the last round boundary, with the last ``s`` rounds' deltas still pending: resuming it with more
rounds continues the run exactly. The flush after the last round (Algorithm 2, lines 12-14) changes the model
once more; that final model goes into a file of its own, so ``ModelCheckpoint``'s files and bookkeeping stay its
own and nothing it wrote is replaced.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

if TYPE_CHECKING:
    import lightning.pytorch as pl

FINAL_CHECKPOINT = "final"


def save_final_checkpoints(trainer: "pl.Trainer", flushed: list[int]) -> None:
    """Write the final global model to ``final.ckpt`` in the folder of every ``ModelCheckpoint`` that saved in
    this fit, once per folder (``final-v1.ckpt`` ... when a file of that name, written before, is there), with
    the weights only where that checkpoint saves weights only."""
    written: set[str] = set()
    for checkpoint in trainer.checkpoint_callbacks:
        if not isinstance(checkpoint, ModelCheckpoint) or checkpoint.dirpath is None:
            continue
        if not (checkpoint.last_model_path or checkpoint.best_model_path):
            continue  # it never saved in this fit: nothing of this run to bring up to date
        folder = str(checkpoint.dirpath)
        if folder in written:
            continue
        written.add(folder)
        path = _free_name(trainer, checkpoint)
        trainer.save_checkpoint(path, weights_only=checkpoint.save_weights_only)
        rank_zero_info(
            f"ParaBlock: flushed rounds {flushed}; {path} holds the final global model (the last round's checkpoint"
            " stays the one to resume from)."
        )


def _free_name(trainer: "pl.Trainer", checkpoint: ModelCheckpoint) -> str:
    """``final.ckpt`` in the checkpoint's folder, or the first ``final-vN.ckpt`` no file has, on any file system
    (decided on rank 0)."""
    folder = str(checkpoint.dirpath)
    filesystem = get_filesystem(folder)
    name = os.path.join(folder, f"{FINAL_CHECKPOINT}{checkpoint.FILE_EXTENSION}")
    version = 0
    while filesystem.exists(name):
        version += 1
        name = os.path.join(folder, f"{FINAL_CHECKPOINT}-v{version}{checkpoint.FILE_EXTENSION}")
    return trainer.strategy.broadcast(name)
