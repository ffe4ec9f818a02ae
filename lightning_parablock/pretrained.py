"""Hugging Face checkpoints loaded the one way this package loads them: never running the checkpoint's own code, and
a checkpoint that cannot load named in one line with what to do instead.

Left to itself, ``from_pretrained`` asks at a terminal whether to run the Python files a checkpoint ships (and a "y"
runs them), or runs a tokenizer's own class without asking. Every load here passes ``trust_remote_code=False``, so
transformers refuses before importing any of them. A local folder is checked before anything loads: it exists, it
is used as given (``~`` expanded), and a model folder holds weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

from lightning_parablock.argument_checks import one_line

Loaded = TypeVar("Loaded")

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)  # fmt: skip
"""What ``save_pretrained`` writes the weights to (one file, or an index of shards)."""
ADAPTER_CONFIG = "adapter_config.json"
"""A peft adapter's folder: its base model is loaded from the name inside, with the same refusals."""


def pretrained_location(
    name: str, value: Union[str, os.PathLike], revision: Optional[str] = None, weights: bool = False
) -> str:
    """What to hand ``from_pretrained`` for the argument ``name``: a local folder with ``~`` expanded, else the
    Hub name as given.

    A value that looks like a path (``/``, ``./``, ``../``, ``~``, or more than one ``/``) must be a folder:
    Hugging Face would read a missing one as a malformed Hub name. A local folder has one version, so a
    ``revision`` with it is refused rather than ignored; with ``weights``, a folder must hold a model's config and
    weights (or be a peft adapter's), so a config-only folder is refused now rather than when the model first
    loads.
    """
    given = os.fspath(value)
    path = Path(given).expanduser()
    looks_local = given.startswith((".", "/", "~")) or path.exists() or given.count("/") > 1
    looks_local = looks_local or not isinstance(value, str)  # a Path object
    if not looks_local:
        return given
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"`{name}={given!r}` {what} (resolved to {path.resolve()}): give a folder written by"
            " `save_pretrained` or a Hub name such as 'meta-llama/Meta-Llama-3-8B'."
        )
    if revision is not None:
        raise ValueError(
            f"`revision={revision!r}` picks a version of a Hub checkpoint, but `{name}={given!r}` is a local folder,"
            " which has only the version on disk: leave `revision` out, or give the Hub name instead of the folder."
        )
    if weights and not (path / ADAPTER_CONFIG).is_file():
        missing = [] if (path / "config.json").is_file() else ["config.json"]
        if not any((path / file).is_file() for file in WEIGHT_FILES):
            missing.append(f"weights (one of {', '.join(WEIGHT_FILES)})")
        if missing:
            raise FileNotFoundError(
                f"`{name}={given!r}` is not a model folder: it holds no {' and no '.join(missing)} ({path.resolve()});"
                " give the folder `save_pretrained` wrote the model to, or train from scratch with `config` instead."
            )
    return str(path)


def load_pretrained(
    load: Callable[..., Loaded],
    name: str,
    value: Union[str, os.PathLike],
    revision: Optional[str] = None,
    weights: bool = False,
    **options: Any,
) -> Loaded:
    """``load(value, trust_remote_code=False, ...)`` (e.g. ``AutoConfig.from_pretrained``) for the argument ``name``,
    never running the checkpoint's own code; a failure is one line naming the checkpoint. ``weights``: see
    :func:`pretrained_location`.

    Raises:
        ValueError: the checkpoint needs its own code to load (nothing of it was run), or transformers cannot read it.
        OSError: the checkpoint is not there (not a Hub name, not cached while offline, gated, files missing).
    """
    location = pretrained_location(name, value, revision, weights)
    given = os.fspath(value)
    if revision is not None:
        options["revision"] = revision
    try:
        return load(location, trust_remote_code=False, **options)
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error):
            raise ValueError(
                f"`{name}={given!r}` needs Python code of its own to load, and lightning_parablock never runs a"
                " checkpoint's code (nothing of it was run): use a checkpoint of an architecture transformers ships"
                " (Llama, Qwen2, Mistral, Gemma, ...), or a copy converted to one."
            ) from None
        at = f" at revision {revision!r}" if revision is not None else ""
        fix = (
            "give a folder `save_pretrained` wrote"
            if Path(location).is_dir()
            else "check the Hub name, the network (or, with HF_HUB_OFFLINE set, that the model is cached) and"
            " `huggingface-cli login` for a gated model; or give a local folder"
        )
        kind = OSError if isinstance(error, OSError) else ValueError  # subclasses may take other arguments
        raise kind(f"Could not load `{name}={given!r}`{at}: {one_line(error).rstrip('.')}; {fix}.") from None

