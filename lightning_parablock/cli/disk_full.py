"""A disk that fills up during training: one line naming where, and the last checkpoint written whole.

Lightning writes a checkpoint straight to its final name, so a write cut short by ``ENOSPC`` leaves a truncated
file that ``--ckpt_path last`` would try to resume. A torch checkpoint is a zip archive whose directory is written
last: a file without one is incomplete. This run's incomplete checkpoints are removed; the complete ones stay.
"""

from __future__ import annotations

import errno
import zipfile
from pathlib import Path
from typing import Optional

from lightning import Trainer

_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(error: BaseException) -> Optional[OSError]:
    """The ``OSError`` saying the disk (or the quota) is full that ``error`` is or came from, if any."""
    seen: set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in _FULL:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def disk_full_message(error: OSError, trainer: Trainer, started_at: float) -> str:
    """What was being written, where training stopped, and the checkpoint to resume from."""
    where = repr(error.filename) if error.filename else f"under {str(trainer.default_root_dir)!r}"
    removed = _remove_incomplete_checkpoints(trainer, started_at)
    last = _last_complete_checkpoint(trainer)
    stopped = f"no space left on device writing {where} in round {trainer.current_epoch}; training stopped."
    if removed:
        stopped += f" Removed the incomplete checkpoint(s) {[str(p) for p in removed]}."
    if last is None:
        return stopped + " No checkpoint of this run was written whole: free space and start again."
    return stopped + f" The last good checkpoint, {str(last)!r}, is intact: free space and resume with `--ckpt_path {last}`."


def _checkpoints(trainer: Trainer) -> list[Path]:
    folders = {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
    return [path for folder in folders if folder.is_dir() for path in folder.glob("*.ckpt") if path.is_file()]


def _remove_incomplete_checkpoints(trainer: Trainer, started_at: float) -> list[Path]:
    """This run's checkpoint files cut short (written since ``started_at``, no zip directory)."""
    incomplete = [p for p in _checkpoints(trainer) if p.stat().st_mtime >= started_at and not zipfile.is_zipfile(p)]
    for path in incomplete:
        path.unlink(missing_ok=True)
    return incomplete


def _last_complete_checkpoint(trainer: Trainer) -> Optional[Path]:
    complete = [p for p in _checkpoints(trainer) if zipfile.is_zipfile(p)]
    return max(complete, key=lambda p: p.stat().st_mtime, default=None)
