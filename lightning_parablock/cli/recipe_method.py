"""A recipe's ``method:`` line: one of the Table 1 methods applied to a LightningCLI config.

``parablock fit --config recipes/tiny.yaml --method fedit`` (or ``method: fedit`` at the top of the
config) keeps everything the config says about data, seed, model, link, local steps, evaluation and
the timeline, and sets what the method decides (:mod:`lightning_parablock.methods.registry`):

- the strategy class (``trainer.strategy.class_path``; the config gives ``FederatedBlockStrategy``
  or the method's own class) and its ``block_patterns``;
- the ``ParaBlockCallback``'s ``staleness`` and ``aggregator``;
- the module's ``lora`` (``{}``, i.e. ``LORA_DEFAULTS``, unless the config gives LoRA options: the
  rank and alpha stay the config's).

**A setting belongs to the method named in its config file.** Every shipped recipe names the method it was
written for (``method: parablock``), so ``--method`` switches any of them alone: a setting the new method
decides otherwise, given in a file whose ``method:`` line names a method that takes it (ParaBlock's
``staleness: 2`` in ``mathinstruct_llama3_8b_staleness_2.yaml``), gives way to the new method's, and a note
says so. The same setting from a file without a ``method:`` line (your own overlay) or from the command line
is yours: a conflicting one is refused before anything is built, naming the option, both values and the way
out on the command line (``--trainer.callbacks.staleness null`` lets the method decide: a config file can
change a value but never delete one). ParaBlock accepts any staleness from 1 (the paper's Table 5).

Strategy options a method does not use (:attr:`~lightning_parablock.methods.registry.Method.unused_options`:
the decoder-block options and the schedule under a method with its own ``block_patterns``; the schedule,
``participation`` and ``clients_per_round`` under FedCyBGD) are set back to their defaults, each with a note.

FedCyBGD trains one client per epoch, so N epochs are one cycle, the paper's round. With
``method: fedcybgd`` every epoch count of the config counts cycles and is multiplied by
``num_clients``: ``trainer.max_epochs``, ``min_epochs``, ``check_val_every_n_epoch`` and the
callbacks' ``every_n_epochs`` / ``every_n_rounds``. Validation and evaluation then come after the
same number of paper rounds as with the other methods.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Optional

import yaml
from jsonargparse import Namespace

from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.aggregation.stacking import StackingAggregator
from lightning_parablock.callbacks.parablock import ParaBlockCallback
from lightning_parablock.methods.registry import METHODS, Method, method, normalized_patterns
from lightning_parablock.strategies.federated_block import FederatedBlockStrategy
from lightning_parablock.strategies.federation_options import FederationOptions

_EPOCH_COUNTS = ("every_n_epochs", "every_n_rounds")  # callback arguments that count epochs

WrittenFor = Callable[[str, Any], Optional[str]]
"""The method a setting was written for, from its option (``trainer.callbacks[0].init_args.staleness``) and value;
``None`` for the user's own (a config file without a ``method:`` line, or the command line)."""


class MethodConflictError(ValueError):
    """The config sets something the method decides, to another value."""


def apply_method(config: Namespace, name: str, written_for: Optional[WrittenFor] = None) -> list[str]:
    """Set in ``config`` (one subcommand's) what method ``name`` decides; the notes to show the user.

    ``written_for`` says which method each setting was written for (see :func:`written_for_by_file`); by default
    every setting was written for the config's own ``method`` line, as in a recipe parsed alone.
    """
    own = config.get("method")
    switch = _Switch(method(name), written_for or (lambda option, value: own))
    switch.strategy(config)
    switch.callback(config)
    switch.model(config)
    if switch.spec.one_client_per_round:
        switch.notes += _scale_epochs(config, switch.spec)
    return switch.notes


class _Switch:
    """One method applied to one config, collecting the notes on what gave way."""

    def __init__(self, spec: Method, written_for: WrittenFor) -> None:
        self.spec = spec
        self.written_for = written_for
        self.notes: list[str] = []

    def settle(
        self,
        option: str,
        given: Any,
        takes: Callable[[Method], bool],
        decided: Any,
        way_out: Optional[str],
        replacement: Any = None,
    ) -> bool:
        """Whether the config's ``given`` value of ``option`` gives way to the method's (``decided``, in words).

        ``False`` when the method ``takes`` it (it stays); ``True`` when the method the setting was written for
        takes it (that method's setting: a note names ``replacement``, by default ``decided``); refused otherwise.
        """
        if takes(self.spec):
            return False
        owner = self.written_for(option, given)
        if owner in METHODS and owner != self.spec.name and takes(method(owner)):
            runs_with = decided if replacement is None else replacement
            self.notes.append(
                f"method {self.spec.name}: `{option}: {_shown(given)}` is {owner}'s setting; it runs with {runs_with!r}"
            )
            return True
        suggestion = (
            f"; on the command line, `{way_out}` lets the method decide (a config file can change a value but not"
            " delete it)"
            if way_out
            else ""
        )
        raise MethodConflictError(
            f"`method: {self.spec.name}` sets `{option}` to {decided!r}, but the config sets {_shown(given)!r}. Remove"
            f" the option (the method decides it) or the `method` line{suggestion}."
        )

    def strategy(self, config: Namespace) -> None:
        spec, strategy = self.spec, config.trainer.strategy
        if not isinstance(strategy, Namespace) or "class_path" not in strategy:
            raise ValueError(
                f"`method: {spec.name}` needs `trainer.strategy` to be a FederatedBlockStrategy config"
                f" (class_path: lightning_parablock.FederatedBlockStrategy), got {strategy!r}."
            )
        given = _class(strategy.class_path)
        generic = given is FederatedBlockStrategy  # the method picks its own class
        way_out = "--trainer.strategy.class_path lightning_parablock.FederatedBlockStrategy"
        if generic or self.settle(
            "trainer.strategy.class_path", strategy.class_path, lambda m: _strategy_fits(given, m),
            _path(spec.strategy_class), way_out,
        ):  # fmt: skip
            strategy.class_path = _path(spec.strategy_class)
            self._drop_arguments_of_another_class(strategy, spec.strategy_class)
        self._block_patterns(strategy.init_args)
        for name in spec.unused_options:
            value = strategy.init_args.get(name, FederationOptions.default(name))
            if value != FederationOptions.default(name):
                strategy.init_args[name] = FederationOptions.default(name)
                self.notes.append(spec.unused_note(name, value))

    def _block_patterns(self, init_args: Namespace) -> None:
        decided, given = self.spec.strategy_args.get("block_patterns"), init_args.get("block_patterns")
        if given is None or normalized_patterns(given) == normalized_patterns(decided):
            init_args.block_patterns = given if decided is None else decided
            return
        option = "trainer.strategy.init_args.block_patterns"
        if self.settle(option, given, lambda m: _patterns_fit(given, m), decided, f"--{option} null"):
            init_args.block_patterns = decided

    def _drop_arguments_of_another_class(self, strategy: Namespace, cls: type) -> None:
        """Arguments only the config's former strategy class takes (FLoRA's ``client_ranks``), dropped."""
        accepted = _init_parameters(cls)
        for key in [key for key in vars(strategy.init_args) if key not in accepted]:
            value = strategy.init_args.pop(key)
            if value is not None:
                self.notes.append(
                    f"method {self.spec.name}: `trainer.strategy.init_args.{key}: {value!r}` does not apply to"
                    f" {cls.__name__}; dropped"
                )

    def callback(self, config: Namespace) -> None:
        spec, callbacks = self.spec, config.trainer.callbacks or []
        found = [
            i for i, c in enumerate(callbacks)
            if isinstance(c, Namespace) and issubclass(_class(c.class_path), ParaBlockCallback)
        ]  # fmt: skip
        if len(found) != 1:
            raise ValueError(
                f"`method: {spec.name}` needs exactly one ParaBlockCallback in `trainer.callbacks`, found {len(found)}."
            )
        index = found[0]
        init_args = callbacks[index].init_args
        last = index == len(callbacks) - 1  # the command line's `--trainer.callbacks.X` sets the last callback's X
        prefix = f"trainer.callbacks[{index}].init_args"
        staleness = init_args.get("staleness")
        decided = f">= {spec.staleness}" if spec.longer_staleness else spec.staleness
        if staleness is None or self.settle(
            f"{prefix}.staleness", staleness, lambda m: m.accepts_staleness(staleness), decided,
            "--trainer.callbacks.staleness null" if last else None, replacement=spec.staleness,
        ):  # fmt: skip
            init_args.staleness = spec.staleness
        aggregator = init_args.get("aggregator")
        carried = Namespace()  # the clients' weighting outlives the rule that gives way to the method's
        if aggregator is not None:
            given = _class(aggregator.class_path)
            if self.settle(
                f"{prefix}.aggregator", aggregator.class_path, lambda m: _aggregator_fits(given, m),
                _path(spec.aggregator_class or Aggregator), "--trainer.callbacks.aggregator null" if last else None,
            ):  # fmt: skip
                weighting = (aggregator.get("init_args") or Namespace()).get("weighting")
                if weighting is not None and spec.aggregator_class is not None:
                    if "weighting" in _init_parameters(spec.aggregator_class):
                        carried.weighting = weighting
                aggregator = None
        if aggregator is None and spec.aggregator_class is not None:
            aggregator = Namespace(class_path=_path(spec.aggregator_class), init_args=carried)
        init_args.aggregator = aggregator

    def model(self, config: Namespace) -> None:
        spec, model = self.spec, config.model
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
            way_out = "--model.init_args.lora null"
            if self.settle("model.init_args.lora", init_args.lora, lambda m: m.lora, None, way_out):
                init_args.lora = None


def written_for_by_file(config: Namespace) -> WrittenFor:
    """Which method each setting of ``config`` was written for: the ``method:`` line of the last ``--config`` file
    that gives the setting, when ``config`` still holds that file's value; ``None`` (the user's own) for a file
    without a ``method:`` line, a value changed on the command line, or one no file gives."""
    files = [_read_config(path) for path in config.get("config") or []]

    def written_for(option: str, value: Any) -> Optional[str]:
        for content in reversed(files):
            found, given = _lookup(content, option)
            if found:
                same = _comparable(option, given) == _comparable(option, value)
                return content.get("method") if same and content.get("method") in METHODS else None
        return None

    return written_for


def _read_config(path: Any) -> dict[str, Any]:
    """A ``--config`` file's content (jsonargparse keeps its ``Path``); ``{}`` for anything else."""
    try:
        content = yaml.safe_load(path.get_content())
    except (AttributeError, OSError, yaml.YAMLError):
        return {}
    return content if isinstance(content, dict) else {}


def _lookup(content: Any, option: str) -> tuple[bool, Any]:
    """``(True, value)`` where the raw config ``content`` gives ``option``; ``trainer.callbacks[i]`` means its
    ParaBlockCallback, wherever the file lists it, and ``init_args`` may be left out (jsonargparse takes both)."""
    node = content
    for key in option.split("."):
        if key.startswith("callbacks["):
            listed = node.get("callbacks") if isinstance(node, dict) else None
            node = next((c for c in listed or [] if isinstance(c, dict) and _names_callback(c.get("class_path"))), None)
            if node is None:
                return False, None
        elif key == "init_args" and isinstance(node, dict):
            node = node.get("init_args", node)
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return False, None
    return True, node


def _names_callback(class_path: Any) -> bool:
    try:
        return isinstance(class_path, str) and issubclass(_class(class_path), ParaBlockCallback)
    except (ImportError, AttributeError, ValueError):
        return False


def _comparable(option: str, value: Any) -> Any:
    """``value`` in a form that compares equal between a raw config file and the parsed config."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict) and "class_path" in value:
        value = value["class_path"]
    if option.endswith(("class_path", "aggregator")) and isinstance(value, str):
        return value.rpartition(".")[2]
    if option.endswith("block_patterns") and isinstance(value, list):
        return normalized_patterns(value)
    return value


def _strategy_fits(given: type, spec: Method) -> bool:
    """Whether a strategy class is one the method runs on: its own class or a subclass, and no other method's."""
    others = {method(other).strategy_class for other in METHODS} - {FederatedBlockStrategy, spec.strategy_class}
    return issubclass(given, spec.strategy_class) and not any(issubclass(given, other) for other in others)


def _patterns_fit(given: list, spec: Method) -> bool:
    """A method with its own blocks takes only those; one on the decoder's blocks takes any but another method's."""
    own = normalized_patterns(spec.strategy_args.get("block_patterns"))
    if own is not None:
        return normalized_patterns(given) == own
    presets = [normalized_patterns(method(name).strategy_args.get("block_patterns")) for name in METHODS]
    return normalized_patterns(given) not in presets


def _aggregator_fits(given: type, spec: Method) -> bool:
    if spec.aggregator_class is not None:
        return issubclass(given, spec.aggregator_class)
    return not issubclass(given, StackingAggregator)


def _init_parameters(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` takes, following ``**kwargs`` up to the base class that names them."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names


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


def _shown(value: Any) -> Any:
    """A config value as the user wrote it (a dict, not a jsonargparse ``Namespace``)."""
    return value.as_dict() if isinstance(value, Namespace) else value


def _class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _path(cls: type) -> str:
    """The short import path the recipes use (``lightning_parablock.FLoRAStrategy``)."""
    return f"lightning_parablock.{cls.__name__}"
