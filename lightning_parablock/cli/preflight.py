"""What ``parablock fit`` checks before the first round, so a bad run stops before it trains or writes anything.

Each check raises a ``ValueError`` naming the values that disagree; the CLI prints it as the one line the user
sees. The data are loaded and tokenized here too, and the partition's labels drawn, so an empty file, a corrupt row
or text that cannot be clustered is found before any run folder exists.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from lightning import LightningDataModule, LightningModule, Trainer

from lightning_parablock._compat import is_a_rank
from lightning_parablock.strategies.checkpoint_file import read_checkpoint_file


class PreflightError(ValueError):
    """The run would fail or lose data; found before training."""


def prepare_data(datamodule: Optional[LightningDataModule]) -> None:
    """Load and tokenize this package's data modules now, and draw the labels their partition splits by (they
    cache both), so data errors come first."""
    if datamodule is None or not type(datamodule).__module__.startswith("lightning_parablock"):
        return
    datamodule.prepare_data()
    datamodule.setup("fit")
    labels = getattr(datamodule, "labels", None)
    if callable(labels):
        labels()


def hf_config(module: LightningModule) -> Optional[Any]:
    """The Hugging Face config of the model inside ``module``, if there is one; read without building a model that
    is built in ``configure_model`` (``CausalLMModule.model_config``)."""
    config = getattr(module, "model_config", None)
    if config is not None and hasattr(config, "vocab_size"):
        return config
    for _, child in module.named_modules():
        config = getattr(child, "config", None)
        if config is not None and hasattr(config, "vocab_size"):
            return config
    return None


def check_vocabulary(module: LightningModule, tokenizer: Any) -> None:
    """The model's embedding must have a row for every token id the tokenizer can produce."""
    config = hf_config(module)
    if config is None or tokenizer is None or not config.vocab_size:
        return
    tokens = len(tokenizer)
    if config.vocab_size < tokens:
        raise PreflightError(
            f"The model's vocabulary (vocab_size={config.vocab_size}) is smaller than the tokenizer's {tokens} tokens:"
            f" ids from {config.vocab_size} on would index past the embedding. Use a model with vocab_size >= {tokens}"
            " (e.g. `--model.init_args.config.vocab_size`) or the tokenizer the model was trained with."
        )


def load_resume_checkpoint(ckpt_path: Optional[str]) -> Optional[dict[str, Any]]:
    """The checkpoint ``--ckpt_path`` names, when it is a file or a folder (refused: no checkpoint); ``last``/``best``
    are resolved by Lightning."""
    if not ckpt_path or not Path(ckpt_path).exists():
        return None
    return read_checkpoint_file(ckpt_path, lambda: torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True))


@contextmanager
def model_init_context(trainer: Trainer) -> Iterator[None]:
    """Where and how ``trainer.fit`` builds a model in ``configure_model``: on the rank's device, in the dtype its
    precision trains. A model the checks build here is the one fit then uses (``configure_model`` builds once), so
    with several processes no rank holds a host copy of the whole model first. A parent that spawns or forks the
    ranks is no rank: it builds on the host (a CUDA context there would break forked ranks)."""
    strategy = trainer.strategy
    with ExitStack() as contexts:
        if is_a_rank(trainer):
            contexts.enter_context(strategy.tensor_init_context())
            contexts.enter_context(strategy.model_sharded_context())
        contexts.enter_context(trainer.precision_plugin.module_init_context())
        yield


def check_checkpoint_matches(checkpoint: dict[str, Any], ckpt_path: str, module: LightningModule) -> None:
    """The checkpoint must hold the model this config builds: same parameter names and shapes.

    LightningCLI would replace the config's model arguments with the checkpoint's hyperparameters; here the
    config stands and a different model is refused, naming both shapes.
    """
    saved: dict[str, torch.Tensor] = checkpoint.get("state_dict", {})
    built = module.state_dict()
    missing = sorted(set(built) - set(saved))
    unexpected = sorted(set(saved) - set(built))
    differing = [name for name in built if name in saved and tuple(saved[name].shape) != tuple(built[name].shape)]
    if not (missing or unexpected or differing):
        return
    lines = [f"`--ckpt_path={ckpt_path}` holds a different model than this config builds:"]
    for name in differing[:3]:
        lines.append(f"  {name}: {tuple(saved[name].shape)} in the checkpoint, {tuple(built[name].shape)} in the config")
    if missing:
        lines.append(f"  {len(missing)} parameter(s) of the config not in the checkpoint, e.g. {missing[0]}")
    if unexpected:
        lines.append(f"  {len(unexpected)} parameter(s) of the checkpoint not in the config, e.g. {unexpected[0]}")
    hparams = checkpoint.get("hyper_parameters", {})
    changed = _changed_hparams(hparams, dict(module.hparams))
    if changed:
        lines.append("  hyperparameters, checkpoint vs config: " + "; ".join(changed[:5]))
    lines.append("Use the config the checkpoint was trained with, or leave out --ckpt_path.")
    raise PreflightError("\n".join(lines))


def _changed_hparams(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(saved) | set(current)):
        if key.startswith("_"):
            continue
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed_hparams(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}={old!r} vs {new!r}")
    return changed
