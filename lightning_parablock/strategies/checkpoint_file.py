"""A checkpoint file read so that an empty, truncated or foreign file is refused in one line naming it.

torch reports such files as an ``EOFError`` with no message, a zip-reader ``RuntimeError``, an ``OSError`` from
seeking before the file's start or a page on ``weights_only``; none names the file. A pickle that would build other objects than tensors and plain values is
refused by weights-only loading (Lightning's default on resume) before anything in it runs.
"""

from __future__ import annotations

import errno
import pickle
from pathlib import Path
from typing import Any, Callable

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_parablock._compat import PathLike


class UnreadableCheckpoint(MisconfigurationException):
    """The checkpoint file is not one torch can read safely."""


def read_checkpoint_file(path: PathLike, load: Callable[[], Any]) -> dict[str, Any]:
    """``load()``, which reads the checkpoint at ``path``; a file it cannot read is refused naming what is wrong."""
    try:
        checkpoint = load()
    except (EOFError, OSError, RuntimeError, pickle.UnpicklingError) as error:
        if isinstance(error, OSError) and error.errno != errno.EINVAL:
            raise  # a missing or unreadable file: the error names it already
        raise UnreadableCheckpoint(f"The checkpoint {path} cannot be read: {_what_is_wrong(path, error)}.") from None
    if not isinstance(checkpoint, dict):
        raise UnreadableCheckpoint(
            f"The checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint's dict (written by"
            " `torch.save` of something else?)."
        )
    return checkpoint


def _what_is_wrong(path: PathLike, error: BaseException) -> str:
    size = _size(path)
    if size == 0:
        return "the file is empty (0 bytes)"
    message = str(error)
    if isinstance(error, (EOFError, OSError)) or "central directory" in message or "zip archive" in message:
        return f"the file ends before its contents do ({size} bytes: truncated, or still being written?)"
    if "GLOBAL" in message:
        found = next((line.strip() for line in message.splitlines() if "GLOBAL" in line), "")
        return (
            "it holds objects other than tensors and plain values, which weights-only loading refuses; nothing in"
            f" it was run ({found})"
        )
    last = next((line.strip() for line in reversed(message.splitlines()) if line.strip() and "documentation" not in line), "")
    return f"it is not a torch checkpoint ({size} bytes that do not unpickle: {last})"


def _size(path: PathLike) -> int:
    try:
        return Path(path).stat().st_size
    except (OSError, TypeError):
        return -1
