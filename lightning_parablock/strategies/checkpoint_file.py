"""A checkpoint file read so that an empty, truncated or foreign file is refused in one line naming it.

torch reports such files as an ``EOFError`` with no message, a zip-reader ``RuntimeError``, an ``OSError`` from
seeking before the file's start or a page on ``weights_only``; none names the file. A pickle that would build other
objects than tensors and plain values is refused by weights-only loading (Lightning's default on resume) before
anything in it runs. A model's weights (``model.safetensors``, which torch reads too, or a saved ``state_dict``) and
a model folder are not checkpoints of a run: they are refused saying how to fine-tune from them instead.
"""

from __future__ import annotations

import errno
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_parablock._compat import PathLike


class UnreadableCheckpoint(MisconfigurationException):
    """The checkpoint file is not one torch can read safely."""


_FINE_TUNE_INSTEAD = (
    "`ckpt_path` resumes a run from a file Lightning saved (e.g. last.ckpt); to fine-tune from a model instead, give"
    " its folder (config.json and weights, as `save_pretrained` writes) as the module's `model_name_or_path`"
    " (`--model.init_args.model_name_or_path`) and leave out `ckpt_path`."
)


def read_checkpoint_file(path: PathLike, load: Callable[[], Any]) -> dict[str, Any]:
    """``load()``, which reads the checkpoint at ``path``; a file it cannot read, or one that holds no Lightning
    checkpoint, is refused naming what is wrong."""
    if isinstance(path, (str, Path)) and Path(path).is_dir():
        model = " with a model's config.json" if (Path(path) / "config.json").is_file() else ""
        raise UnreadableCheckpoint(f"The checkpoint {path} is a folder{model}, not a file. {_FINE_TUNE_INSTEAD}")
    if _is_safetensors(path):  # torch reads these by path (the CLI's check), not through Lightning's file object
        raise UnreadableCheckpoint(
            f"The checkpoint {path} is not a Lightning checkpoint: it is a safetensors file of a model's weights."
            f" {_FINE_TUNE_INSTEAD}"
        )
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
    if "state_dict" not in checkpoint:
        what = _contents(checkpoint)
        raise UnreadableCheckpoint(f"The checkpoint {path} is not a Lightning checkpoint: {what}. {_FINE_TUNE_INSTEAD}")
    return checkpoint


def _is_safetensors(path: PathLike) -> bool:
    """The safetensors layout: an 8-byte little-endian header length, then the JSON header, then the tensors."""
    try:
        with open(path, "rb") as file:
            head = file.read(9)
        size = _size(path)
    except (OSError, TypeError):
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size


def _contents(checkpoint: dict[str, Any]) -> str:
    """What a dict without a ``state_dict`` holds, to say what it was written as."""
    tensors = [key for key, value in checkpoint.items() if isinstance(value, torch.Tensor)]
    if tensors and len(tensors) == len(checkpoint):
        return (
            f"it holds {len(tensors)} tensors such as {tensors[0]!r} and no 'state_dict', as a model's weights do"
            " (model.safetensors, pytorch_model.bin, `torch.save(model.state_dict())`)"
        )
    keys = ", ".join(repr(key) for key in list(checkpoint)[:5]) or "nothing"
    return f"it has no 'state_dict' (its keys: {keys})"


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
