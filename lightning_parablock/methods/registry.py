"""Every method of the paper's Table 1 as settings of the same strategy, callback and module.

One name picks the method; the data split, seed, model, evaluation and timeline stay the
caller's, so runs stay comparable. Most methods are presets over the block machinery:

===========  ===========================================  =========  ==========
method       what one round trains                        staleness  LoRA
===========  ===========================================  =========  ==========
parablock    one decoder block, exchange overlapped       ≥ 1        no
fedbcd       one decoder block, then exchange             0          no
full_ft      every parameter (FedAvg)                     0          no
fedit        every LoRA adapter (FedAvg of A and B)       0          yes
ffa_lora     LoRA B only; A stays at its seeded init      0          yes
flora        every LoRA adapter, stacked and merged       0          yes
fedcybgd     one client, its own block, model passed on   0          no
===========  ===========================================  =========  ==========

FLoRA and FedCyBGD need their own strategy classes (:mod:`lightning_parablock.strategies.flora`,
:mod:`lightning_parablock.strategies.fedcybgd`); FLoRA also its aggregator. ParaBlock accepts any staleness
from 1 up (the paper's Table 5); every other method is synchronous. A recipe switches the method
with one line, ``method: fedit`` (see :mod:`lightning_parablock.cli.recipe_method`); a run's timeline
names the method its settings match (:func:`identify`).

Some strategy options mean nothing to some methods (:attr:`Method.unused_options`): the methods with their own
``block_patterns`` (one block: every parameter, or the adapters) use no decoder-block option and no schedule;
FedCyBGD's cycle fixes the schedule and who trains. Switching a method (``method(name).strategy(...)`` or a
recipe's ``method:``) sets them back to their defaults and says so; ``FederatedBlockStrategy`` built by hand
refuses them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union, get_args

from lightning.pytorch.utilities import rank_zero_warn

from lightning_parablock.aggregation.aggregator import Aggregator, Weighting
from lightning_parablock.aggregation.mean import MeanAggregator
from lightning_parablock.aggregation.stacking import StackingAggregator
from lightning_parablock.strategies.fedcybgd import FedCyBGDStrategy
from lightning_parablock.strategies.federated_block import FederatedBlockStrategy
from lightning_parablock.strategies.federation_options import (
    DECODER_BLOCK_OPTIONS,
    SCHEDULE_OPTIONS,
    FederationOptions,
)
from lightning_parablock.strategies.flora import FLoRAStrategy

MethodName = Literal["parablock", "fedbcd", "full_ft", "fedit", "ffa_lora", "flora", "fedcybgd"]
METHODS: tuple[str, ...] = get_args(MethodName)
CYCLE_OPTIONS = ("participation", "clients_per_round")
"""Who trains in a round; FedCyBGD's cycle decides it."""


@dataclass(frozen=True)
class Method:
    """What a method sets; everything else (data, model, seeds, link, local steps) is the caller's."""

    name: str
    title: str  # as the paper's Table 1 names it
    staleness: int
    strategy_class: type[FederatedBlockStrategy] = FederatedBlockStrategy
    strategy_args: dict[str, Any] = field(default_factory=dict)  # override the caller's strategy arguments
    lora: bool = False
    aggregator_class: Optional[type[Aggregator]] = None
    one_client_per_round: bool = False  # FedCyBGD: a cycle over N clients takes N rounds
    longer_staleness: bool = False  # ParaBlock: any staleness >= `staleness` is still the method

    def accepts_staleness(self, staleness: int) -> bool:
        """Whether a run at ``staleness`` is still this method (a recipe may set it only then)."""
        return staleness == self.staleness or (self.longer_staleness and staleness > self.staleness)

    def rounds(self, cycles: int, num_clients: int) -> int:
        """Rounds (epochs) for ``cycles`` rounds of the paper's kind, where every client trains once."""
        return cycles * num_clients if self.one_client_per_round else cycles

    @property
    def unused_options(self) -> tuple[str, ...]:
        """Strategy options this method does not use: its own ``block_patterns`` (one block) replace the decoder's
        blocks and leave no schedule to choose; FedCyBGD's cycle fixes the schedule and who trains."""
        if "block_patterns" in self.strategy_args:
            return DECODER_BLOCK_OPTIONS + SCHEDULE_OPTIONS
        if self.one_client_per_round:
            return SCHEDULE_OPTIONS + CYCLE_OPTIONS
        return ()

    def unused_note(self, name: str, value: Any) -> str:
        """Why option ``name`` (given as ``value``) is set back to its default under this method."""
        why = "its block_patterns replace the decoder's blocks" if "block_patterns" in self.strategy_args else (
            "its cycle trains every client in turn, each on its own block"
        )
        default = FederationOptions.default(name)
        return f"method {self.name}: {name}={value!r} does not apply ({why}); it runs with {default!r}"

    def strategy(self, **kwargs: Any) -> FederatedBlockStrategy:
        """The method's strategy over the caller's options; options the method does not use are set back to their
        defaults, with a warning naming each one."""
        for name in self.unused_options:
            if name in kwargs and kwargs[name] != FederationOptions.default(name):
                rank_zero_warn(self.unused_note(name, kwargs.pop(name)))
        return self.strategy_class(**{**kwargs, **copy.deepcopy(self.strategy_args)})

    def callback_args(self, weighting: Weighting = "uniform") -> dict[str, Any]:
        """The ``ParaBlockCallback`` arguments the method decides (see ``ParaBlockCallback.for_method``), its
        aggregator weighting clients by ``weighting``."""
        aggregator_class = self.aggregator_class or MeanAggregator
        aggregator = aggregator_class(weighting=weighting) if self.aggregator_class or weighting != "uniform" else None
        return {"staleness": self.staleness, "aggregator": aggregator}

    def module_args(self, lora: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """``CausalLMModule`` arguments: the LoRA options (``{}`` for the defaults) for adapter methods."""
        return {"lora": dict(lora or {})} if self.lora else {}


_ALL_PARAMETERS = [".*"]
_ADAPTERS = ["lora_"]

_METHODS = {
    "parablock": Method("parablock", "ParaBlock", staleness=1, longer_staleness=True),
    "fedbcd": Method("fedbcd", "FedBCD", staleness=0),
    "full_ft": Method("full_ft", "Full FT", staleness=0, strategy_args={"block_patterns": [_ALL_PARAMETERS]}),
    "fedit": Method("fedit", "FedIT", staleness=0, strategy_args={"block_patterns": [_ADAPTERS]}, lora=True),
    "ffa_lora": Method("ffa_lora", "FFA-LoRA", staleness=0, strategy_args={"block_patterns": [["lora_B"]]}, lora=True),
    "flora": Method(
        "flora",
        "FLoRA",
        staleness=0,
        strategy_class=FLoRAStrategy,
        strategy_args={"block_patterns": [_ADAPTERS]},
        lora=True,
        aggregator_class=StackingAggregator,
    ),
    "fedcybgd": Method("fedcybgd", "FedCyBGD", staleness=0, strategy_class=FedCyBGDStrategy, one_client_per_round=True),
}


def method(name: str) -> Method:
    """The settings of one of :data:`METHODS`."""
    if name not in _METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {name!r}.")
    return _METHODS[name]


def identify(strategy: FederatedBlockStrategy, staleness: int, aggregator: Aggregator) -> Optional[str]:
    """The method whose settings a run has (strategy class, blocks, staleness, aggregator), or ``None``.

    Read from the objects rather than from a label, so a run built by hand, by :func:`method` or by a
    recipe's ``method:`` line is named the same way in its timeline.
    """
    patterns = normalized_patterns(strategy.options.block_patterns)
    presets = {name: normalized_patterns(s.strategy_args.get("block_patterns")) for name, s in _METHODS.items()}
    for spec in _METHODS.values():
        preset = presets[spec.name]
        if preset is not None:
            blocks_match = patterns == preset
        else:  # a method without blocks of its own (decoder blocks) matches any blocks but another method's
            blocks_match = patterns is None or patterns not in presets.values()
        stacking = isinstance(aggregator, StackingAggregator)
        if (
            type(strategy) is spec.strategy_class
            and blocks_match
            and spec.accepts_staleness(staleness)
            and stacking == (spec.aggregator_class is StackingAggregator)
        ):
            return spec.name
    return None


def normalized_patterns(patterns: Optional[Sequence[Union[str, Sequence[str]]]]) -> Optional[list[list[str]]]:
    """``block_patterns`` with every block as a list of patterns (a block may be given as one string)."""
    if patterns is None:
        return None
    return [[entry] if isinstance(entry, str) else list(entry) for entry in patterns]
