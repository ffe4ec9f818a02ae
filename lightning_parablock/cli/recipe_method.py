"""A recipe's ``method:`` line: one of the Table 1 methods applied to a LightningCLI config.

``parablock fit --config recipes/tiny.yaml --method fedit`` (or ``method: fedit`` at the top of the
config) keeps everything the config says about data, seed, model, link, local steps, evaluation and
the timeline, and sets what the method decides (:mod:`lightning_parablock.methods.registry`):

- the strategy class (``trainer.strategy.class_path``; the config gives ``FederatedBlockStrategy``
  or the method's own class) and its ``block_patterns``;
- the ``ParaBlockCallback``'s ``staleness`` and ``aggregator``;
- the module's ``lora`` (``{}``, i.e. ``LORA_DEFAULTS``, unless the config gives LoRA options: the
  rank and alpha stay the config's).

A config that sets one of these to something else is refused before anything is built, naming the
option, the config's value and the method's: no silent precedence either way. ParaBlock accepts any
staleness from 1 (the paper's Table 5). A method that uses no LoRA refuses a config with ``lora``.

FedCyBGD trains one client per epoch, so N epochs are one cycle, the paper's round. With
``method: fedcybgd`` every epoch count of the config counts cycles and is multiplied by
``num_clients``: ``trainer.max_epochs``, ``min_epochs``, ``check_val_every_n_epoch`` and the
callbacks' ``every_n_epochs`` / ``every_n_rounds``. Validation and evaluation then come after the
same number of paper rounds as with the other methods.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

from jsonargparse import Namespace

from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.aggregation.stacking import StackingAggregator
from lightning_parablock.callbacks.parablock import ParaBlockCallback
from lightning_parablock.methods.registry import METHODS, Method, method, normalized_patterns
from lightning_parablock.strategies.federated_block import FederatedBlockStrategy

_EPOCH_COUNTS = ("every_n_epochs", "every_n_rounds")  # callback arguments that count epochs


class MethodConflictError(ValueError):
    """The config sets something the method decides, to another value."""


def apply_method(config: Namespace, name: str) -> list[str]:
    """Set in ``config`` (one subcommand's) what method ``name`` decides; the notes to show the user."""
    spec = method(name)
    _apply_to_strategy(config, spec)
    _apply_to_callback(config, spec)
    _apply_to_model(config, spec)
    return _scale_epochs(config, spec) if spec.one_client_per_round else []


def _conflict(spec: Method, option: str, decided: Any, given: Any) -> MethodConflictError:
    return MethodConflictError(
        f"`method: {spec.name}` sets `{option}` to {decided!r}, but the config sets {given!r}. Remove the"
        f" option (the method decides it) or the `method` line."
    )


def _class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _apply_to_strategy(config: Namespace, spec: Method) -> None:
    strategy = config.trainer.strategy
    if not isinstance(strategy, Namespace) or "class_path" not in strategy:
        raise ValueError(
            f"`method: {spec.name}` needs `trainer.strategy` to be a FederatedBlockStrategy config"
            f" (class_path: lightning_parablock.FederatedBlockStrategy), got {strategy!r}."
        )
    given = _class(strategy.class_path)
    others = {method(other).strategy_class for other in METHODS} - {FederatedBlockStrategy, spec.strategy_class}
    if (given is not FederatedBlockStrategy and not issubclass(given, spec.strategy_class)) or any(
        issubclass(given, other) for other in others
    ):
        raise _conflict(spec, "trainer.strategy.class_path", _path(spec.strategy_class), strategy.class_path)
    if given is FederatedBlockStrategy:
        strategy.class_path = _path(spec.strategy_class)
    for key, value in spec.strategy_args.items():
        option = f"trainer.strategy.init_args.{key}"
        current = strategy.init_args.get(key)
        if current is None:
            strategy.init_args[key] = value
        elif normalized_patterns(current) != normalized_patterns(value):
            raise _conflict(spec, option, value, current)


def _apply_to_callback(config: Namespace, spec: Method) -> None:
    found = [
        (i, c) for i, c in enumerate(config.trainer.callbacks or [])
        if isinstance(c, Namespace) and issubclass(_class(c.class_path), ParaBlockCallback)
    ]  # fmt: skip
    if len(found) != 1:
        raise ValueError(
            f"`method: {spec.name}` needs exactly one ParaBlockCallback in `trainer.callbacks`, found {len(found)}."
        )
    index, callback = found[0]
    prefix = f"trainer.callbacks[{index}].init_args"
    staleness = callback.init_args.get("staleness")
    if staleness is None:
        callback.init_args.staleness = spec.staleness
    elif not spec.accepts_staleness(staleness):
        decided = f">= {spec.staleness}" if spec.longer_staleness else spec.staleness
        raise _conflict(spec, f"{prefix}.staleness", decided, staleness)
    aggregator = callback.init_args.get("aggregator")
    if spec.aggregator_class is not None:
        if aggregator is None:
            callback.init_args.aggregator = Namespace(class_path=_path(spec.aggregator_class), init_args=Namespace())
        elif not issubclass(_class(aggregator.class_path), spec.aggregator_class):
            raise _conflict(spec, f"{prefix}.aggregator", _path(spec.aggregator_class), aggregator.class_path)
    elif aggregator is not None and issubclass(_class(aggregator.class_path), StackingAggregator):
        raise _conflict(spec, f"{prefix}.aggregator", _path(Aggregator), aggregator.class_path)


def _apply_to_model(config: Namespace, spec: Method) -> None:
    model = config.model
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    if init_args is None or "lora" not in init_args:
        if spec.lora:
            raise ValueError(
                f"`method: {spec.name}` trains LoRA adapters: it needs a model with a `lora` argument, such as"
                f" lightning_parablock.CausalLMModule, got {getattr(model, 'class_path', model)!r}."
            )
        return
    if spec.lora and init_args.lora is None:
        init_args.lora = {}  # LORA_DEFAULTS
    elif not spec.lora and init_args.lora is not None:
        raise _conflict(spec, "model.init_args.lora", None, init_args.lora)


def _scale_epochs(config: Namespace, spec: Method) -> list[str]:
    """Every epoch count of the config, read as cycles, in epochs (one client's turn each)."""
    clients = config.trainer.strategy.init_args.num_clients
    trainer = config.trainer
    if not isinstance(trainer.max_epochs, int) or trainer.max_epochs < 1:
        raise ValueError(
            f"`method: {spec.name}` reads `trainer.max_epochs` as cycles (every client trains once per cycle):"
            f" give a positive number, got {trainer.max_epochs!r}."
        )
    cycles = trainer.max_epochs
    trainer.max_epochs = spec.rounds(cycles, clients)
    for key in ("min_epochs", "check_val_every_n_epoch"):
        if isinstance(trainer.get(key), int):
            trainer[key] = spec.rounds(trainer[key], clients)
    for callback in trainer.callbacks or []:
        args: Optional[Namespace] = callback.get("init_args") if isinstance(callback, Namespace) else None
        for key in _EPOCH_COUNTS:
            if args is not None and isinstance(args.get(key), int):
                args[key] = spec.rounds(args[key], clients)
    return [
        f"method {spec.name}: one client trains per epoch, so trainer.max_epochs={cycles} cycles over {clients}"
        f" clients is {trainer.max_epochs} epochs (validation and evaluation intervals scaled the same way)"
    ]


def _path(cls: type) -> str:
    """The short import path the recipes use (``lightning_parablock.FLoRAStrategy``)."""
    return f"lightning_parablock.{cls.__name__}"
