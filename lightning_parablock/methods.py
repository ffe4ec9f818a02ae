"""Every method of the paper's Table 1 as settings of the same strategy, callback and module.

One name picks the method; the data split, seed, model, evaluation and timeline stay the
caller's, so runs stay comparable. Most methods are presets over the block machinery:

===========  ===========================================  =========  ==========
method       what one round trains                        staleness  LoRA
===========  ===========================================  =========  ==========
parablock    one decoder block, exchange overlapped       1          no
fedbcd       one decoder block, then exchange             0          no
full_ft      every parameter (FedAvg)                     0          no
fedit        every LoRA adapter (FedAvg of A and B)       0          yes
ffa_lora     LoRA B only; A stays at its seeded init      0          yes
flora        every LoRA adapter, stacked and merged       0          yes
fedcybgd     one client, its own block, model passed on   0          no
===========  ===========================================  =========  ==========

FLoRA and FedCyBGD need their own strategy classes (:mod:`lightning_parablock.flora`,
:mod:`lightning_parablock.fedcybgd`); FLoRA also its aggregator.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args

from lightning_parablock.aggregate import Aggregator
from lightning_parablock.callback import ParaBlockCallback
from lightning_parablock.comm import SimulatedLink
from lightning_parablock.fedcybgd import FedCyBGDStrategy
from lightning_parablock.flora import FLoRAStrategy, StackingAggregator
from lightning_parablock.strategy import FederatedBlockStrategy

MethodName = Literal["parablock", "fedbcd", "full_ft", "fedit", "ffa_lora", "flora", "fedcybgd"]
METHODS: tuple[str, ...] = get_args(MethodName)


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

    def rounds(self, cycles: int, num_clients: int) -> int:
        """Rounds (epochs) for ``cycles`` rounds of the paper's kind, where every client trains once."""
        return cycles * num_clients if self.one_client_per_round else cycles

    def strategy(self, **kwargs: Any) -> FederatedBlockStrategy:
        return self.strategy_class(**{**kwargs, **copy.deepcopy(self.strategy_args)})

    def callback(self, link: Optional[SimulatedLink] = None, **kwargs: Any) -> ParaBlockCallback:
        aggregator = self.aggregator_class() if self.aggregator_class is not None else None
        return ParaBlockCallback(staleness=self.staleness, link=link, aggregator=aggregator, **kwargs)

    def module_args(self, lora: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """``CausalLMModule`` arguments: the LoRA options (``{}`` for the defaults) for adapter methods."""
        return {"lora": dict(lora or {})} if self.lora else {}


_ALL_PARAMETERS = [".*"]
_ADAPTERS = ["lora_"]

_METHODS = {
    "parablock": Method("parablock", "ParaBlock", staleness=1),
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
