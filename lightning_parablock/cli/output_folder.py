"""The final model folder (``--output_dir``): checked before training, written so nothing the user owns is lost.

Rules: the folder is checked before the first round (not a file, not the current directory, not the run's own
logs or checkpoints, writable); a non-empty folder is replaced only when this tool wrote it (it holds
:data:`MARKER`) or the user asked (``overwrite``); the model is written beside the target and moved in place;
if another run wrote the target meanwhile, this run's model goes beside it under its own name; if writing fails,
the model is kept in a fallback folder and the message says where.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

MARKER = ".parablock_output.json"
STATE_DICT_FILENAME = "model_state_dict.pt"
ADAPTER_FOLDER = "adapter"
"""Where a LoRA model's adapter alone goes, inside the output folder (peft's format), when it is the model."""


class OutputDirError(ValueError):
    """``--output_dir`` cannot take the final model; raised before training."""


@dataclass
class OutputPlan:
    """A checked output folder and what it held when checked (to notice another run writing it meanwhile)."""

    path: Path
    overwrite: bool
    found: Optional[dict[str, Any]]  # the marker of the previous output there, None if none
    contents: str  # what will be written, in words


@dataclass
class SavedModel:
    path: Path
    contents: str
    note: str = ""  # replaced a previous output, went beside it, or fell back after a failure
    elsewhere: bool = False  # not in the folder asked for (beside it, or a fallback): `fit && upload` must not go on


def read_marker(folder: Path) -> Optional[dict[str, Any]]:
    """The marker of a model folder written by this tool, or None."""
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def describe_contents(module: nn.Module) -> str:
    """What :func:`write_model` will write for ``module``, in words."""
    if hasattr(module, "save_pretrained"):
        return f"{type(module).__name__}.save_pretrained"
    name, _ = _hf_model(module)
    if name is not None:
        return f"the Hugging Face model `{name}` inside {type(module).__name__} (save_pretrained)"
    return f"the state dict of {type(module).__name__} ({STATE_DICT_FILENAME}; no Hugging Face model inside)"


def _hf_model(module: nn.Module) -> tuple[Optional[str], Optional[nn.Module]]:
    """The first submodule with ``save_pretrained`` (a Hugging Face model), with its name."""
    for name, child in module.named_modules():
        if name and hasattr(child, "save_pretrained") and hasattr(child, "config"):
            return name, child
    return None, None


def check_output_dir(
    output_dir: str | Path, run_dirs: Sequence[str | Path], module: nn.Module, overwrite: bool = False
) -> OutputPlan:
    """Refuse an output folder that could lose data or that cannot be written, before anything is trained.

    Args:
        run_dirs: the run's own folders (default_root_dir, log dir, checkpoint dir): neither they nor a folder
            holding them may be the output.
        overwrite: replace a non-empty folder that this tool did not write.
    """
    path = Path(output_dir).expanduser()
    resolved = path.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise OutputDirError(
            f"`--output_dir={str(output_dir)!r}` is the current directory (or holds it); the final model needs a"
            " folder of its own, e.g. `--output_dir final_model`."
        )
    for run_dir in run_dirs:
        run_resolved = Path(run_dir).expanduser().resolve()
        if resolved == run_resolved or resolved in run_resolved.parents:
            raise OutputDirError(
                f"`--output_dir={str(output_dir)!r}` is (or holds) this run's own folder {str(run_dir)!r} with its"
                f" logs and checkpoints; writing the model there would replace them. Use a folder of its own,"
                f" e.g. `--output_dir {Path(run_dir) / 'final_model'}`."
            )
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"`--output_dir={str(output_dir)!r}` is a file; give a folder for the final model.")
    found = read_marker(path) if path.is_dir() else None
    if path.is_dir() and any(path.iterdir()) and found is None and not overwrite:
        raise OutputDirError(
            f"`--output_dir={str(output_dir)!r}` is a non-empty folder that parablock did not write (it has no"
            f" {MARKER}); it is left untouched. Choose another folder, or pass `--overwrite_output true` to"
            " replace its contents on purpose."
        )
    _check_writable(path, output_dir)
    return OutputPlan(path, overwrite, found, describe_contents(module))


def _check_writable(path: Path, given: str | Path) -> None:
    """Write and remove a probe file in the nearest existing folder (``os.access`` says yes to root)."""
    existing = path if path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"`--output_dir={str(given)!r}` cannot be made: {str(existing)!r} is a file.")
    probe = existing / f".parablock_probe.{uuid.uuid4().hex}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as error:
        raise OutputDirError(f"`--output_dir={str(given)!r}` cannot be written: {error}.") from None


def write_model(module: nn.Module, tokenizer: Any, folder: Path, run_id: str) -> str:
    """Write what can be saved of ``module`` (and ``tokenizer``) into the new ``folder``, with the marker."""
    folder.mkdir(parents=True)
    contents = describe_contents(module)
    if hasattr(module, "save_pretrained"):
        if "tokenizer" in inspect.signature(module.save_pretrained).parameters:
            module.save_pretrained(folder, tokenizer=tokenizer)
            tokenizer = None
        else:
            module.save_pretrained(folder)
    else:
        _, hf_model = _hf_model(module)
        if hf_model is not None:
            hf_model.save_pretrained(folder)
        else:
            torch.save(module.state_dict(), folder / STATE_DICT_FILENAME)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    contents += write_adapter(module, folder)
    marker = {"written_by": "lightning_parablock", "run": run_id, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "contents": contents}  # fmt: skip
    (folder / MARKER).write_text(json.dumps(marker, indent=1))
    return contents


def write_adapter(module: nn.Module, folder: Path) -> str:
    """Beside a LoRA model's merged weights, its adapter alone in ``folder/adapter`` (peft's format), when applied to
    the checkpoint it is this model (``CausalLMModule.adapter_mismatch``); what was done, in words, for the summary."""
    hparams = getattr(module, "hparams", {})
    if hparams.get("lora") is None or not callable(getattr(module, "adapter_mismatch", None)):
        return ""
    from lightning_parablock.module import AdapterMismatch  # here: only a LoRA model's save needs the module room

    try:
        module.save_adapter(folder / ADAPTER_FOLDER)  # checks, then writes: the checkpoint is read once
    except AdapterMismatch as refusal:
        return f"; no adapter-only copy: {refusal.reason}"
    return f"; the LoRA adapter alone in {ADAPTER_FOLDER}/ (PeftModel.from_pretrained(base, '{ADAPTER_FOLDER}'))"


def save_model(
    module: nn.Module, tokenizer: Any, plan: OutputPlan, run_id: str, fallback_root: Optional[Path] = None
) -> SavedModel:
    """Write the model to ``plan.path`` without ever losing it or anything the run did not create.

    Written to a staging folder beside the target first; the previous output moves aside only once the new
    one is complete. If writing fails, the model goes to ``fallback_root`` (else a temporary folder).
    """
    target = plan.path
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        contents = write_model(module, tokenizer, staging, run_id)
        return _move_in_place(staging, plan, contents, run_id)
    except Exception as error:  # the trained model must outlive any failure to write it where asked
        shutil.rmtree(staging, ignore_errors=True)
        kept, contents = _fallback(module, tokenizer, run_id, fallback_root)
        reason = f"{type(error).__name__}: {error}"
        note = f"could not write {str(target)!r} ({reason}); kept the model in {str(kept)!r}"
        return SavedModel(kept, contents, note, elsewhere=True)


def _move_in_place(staging: Path, plan: OutputPlan, contents: str, run_id: str) -> SavedModel:
    target = plan.path
    now = read_marker(target) if target.is_dir() else None
    occupied = target.is_dir() and any(target.iterdir())
    if occupied and not plan.overwrite and now != plan.found:
        # another run (or the user) filled the folder since the check: keep both
        beside = target.with_name(f"{target.name}-{run_id}")
        os.replace(staging, beside)
        who = f"run {now['run']}" if now else "something else"
        note = f"{str(target)!r} was written by {who} during this run; left it and wrote beside it, in {str(beside)!r}"
        return SavedModel(beside, contents, note, elsewhere=True)
    if not occupied:
        if target.is_dir():
            target.rmdir()
        os.replace(staging, target)
        return SavedModel(target, contents)
    aside = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    os.replace(target, aside)
    os.replace(staging, target)
    shutil.rmtree(aside, ignore_errors=True)
    previous = f"the model of run {now['run']}" if now else "the folder's previous contents (--overwrite_output)"
    return SavedModel(target, contents, f"replaced {previous}")


def _fallback(module: nn.Module, tokenizer: Any, run_id: str, root: Optional[Path]) -> tuple[Path, str]:
    """Write the model under ``root``, else the temporary folder; as a plain state dict if the usual way fails."""
    for parent in ([root] if root is not None else []) + [Path(tempfile.gettempdir())]:
        folder = parent / f"parablock_final_model-{run_id}"
        try:
            return folder, write_model(module, tokenizer, folder, run_id)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.mkdir(parents=True)
            torch.save(module.state_dict(), folder / STATE_DICT_FILENAME)
            return folder, f"the state dict of {type(module).__name__} ({STATE_DICT_FILENAME})"
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
    raise OSError("Could not write the final model anywhere (the output folder, the run folder, the temp folder).")
