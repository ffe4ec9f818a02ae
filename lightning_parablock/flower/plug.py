"""Where the Flower transport meets the rest of the library: the run's exchange, the strategy and the aggregator.

A Flower site is a one-process Trainer whose :class:`~lightning_parablock.strategies.exchange_spec.ExchangeSpec`
has the site as its transport: the strategy places clients by (site, number of sites) as it places them by ranks,
and the site's transport exchanges through its mailbox. What the site reads of its Trainer (the spec, the
strategy's settings and blocks, ``ParaBlockCallback``'s records) and what the server rebuilds from a site's word
(the aggregator) is here, so that a change of the library's exchange contract changes this module only.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, Callable

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.aggregation.mean import MeanAggregator
from lightning_parablock.aggregation.median import MedianAggregator
from lightning_parablock.aggregation.trimmed_mean import TrimmedMeanAggregator
from lightning_parablock.callbacks.parablock import ParaBlockCallback
from lightning_parablock.comm.by_processes import ByProcesses
from lightning_parablock.comm.transport import BlockLayout, TransportChoice
from lightning_parablock.flower.arrays import codec_on_the_wire
from lightning_parablock.flower.handshake import Hello, weights_fingerprint
from lightning_parablock.strategies.exchange_spec import ExchangeSpec
from lightning_parablock.strategies.federated_block import FederatedBlockStrategy

if TYPE_CHECKING:
    import lightning.pytorch as pl

RULES: dict[str, type[Aggregator]] = {
    rule.__name__: rule for rule in (MeanAggregator, MedianAggregator, TrimmedMeanAggregator)
}
"""The aggregators a server rebuilds from a site's settings (FLoRA's stacking, and rules of one's own, stay local)."""


def aggregator_settings(aggregator: Aggregator) -> dict[str, Any]:
    """What the server builds the same aggregator from (JSON): its class and its constructor's settings."""
    if type(aggregator).__name__ not in RULES or type(aggregator) is not RULES[type(aggregator).__name__]:
        raise MisconfigurationException(
            f"The Flower server rebuilds the sites' aggregator from its settings; it knows {sorted(RULES)}, got"
            f" {aggregator!r}."
        )
    return {"rule": type(aggregator).__name__, "settings": aggregator.settings()}


def aggregator_from_settings(described: Mapping[str, Any]) -> Aggregator:
    """The aggregator a site described with :func:`aggregator_settings`: the same rule, the same settings."""
    rule = RULES.get(str(described.get("rule")))
    if rule is None:
        raise ValueError(f"the sites' aggregator {described.get('rule')!r} is none of {sorted(RULES)}")
    return rule(**dict(described.get("settings", {})))


def take_the_exchange(trainer: "pl.Trainer", site: TransportChoice) -> ExchangeSpec:
    """Make ``site`` the transport of the run's exchange (``ParaBlockCallback`` handed the strategy its spec at its
    setup, before this one), check that this Trainer can be a Flower site, and return the spec."""
    strategy = trainer.strategy
    if not isinstance(strategy, FederatedBlockStrategy):
        raise MisconfigurationException(
            f"FlowerSite needs `Trainer(strategy=FederatedBlockStrategy(...))`, got {type(strategy).__name__}."
        )
    spec = strategy.exchange_spec
    if spec is None:
        raise MisconfigurationException(
            "FlowerSite must come after ParaBlockCallback in the Trainer's callbacks (it takes the exchange the"
            " callback sets up)."
        )
    if spec.transport is not site:
        if not isinstance(spec.transport, ByProcesses):
            raise MisconfigurationException(
                f"The exchange already has the transport {spec.transport!r}; FlowerSite would replace it."
            )
        spec = replace(spec, transport=site)
        strategy.configure_exchange(spec)
    if strategy.distributed:
        raise MisconfigurationException(
            f"A Flower site is one process; this Trainer runs {strategy.world_size} (devices × num_nodes): give each"
            " site one device."
        )
    if trainer.max_steps != -1 or trainer.max_epochs is None or trainer.max_epochs < 1:
        raise MisconfigurationException(
            "Flower sites end by rounds: set `max_epochs` (the same on every site) and leave `max_steps` unset,"
            f" got max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}."
        )
    if spec.link.bandwidth is not None or spec.link.transfer_seconds(0) > 0:
        raise MisconfigurationException(
            "The Flower transport's link is real and measured; remove ParaBlockCallback's modelled `link`"
            f" ({spec.link!r})."
        )
    aggregator_settings(spec.aggregator)
    codec_on_the_wire(spec.codec)
    return spec


def codec_name(spec: ExchangeSpec) -> str:
    return codec_on_the_wire(spec.codec)


def hello(trainer: "pl.Trainer", site: int, num_sites: int, layout: Callable[[int], BlockLayout]) -> Hello:
    """This site's answer to the handshake (see :func:`~.handshake.check_hellos`), at the start of training."""
    strategy: FederatedBlockStrategy = trainer.strategy  # type: ignore[assignment]
    spec = strategy.exchange_spec
    assert spec is not None and strategy.num_blocks is not None
    pending = strategy.rounds_awaiting_exchange()
    trainable = strategy.turns.trainable
    return {
        "site": site,
        "num_sites": num_sites,
        "library_version": importlib.metadata.version("lightning_parablock"),
        "num_clients": strategy.options.num_clients,
        "placement": list(strategy.placement),
        "rounds": trainer.max_epochs,
        "staleness": spec.staleness,
        "codec": codec_on_the_wire(spec.codec),
        "aggregator": aggregator_settings(spec.aggregator),
        "comm_timeout": spec.comm_timeout,
        "layout": [[[name, list(shape)] for name, shape in layout(block)] for block in range(strategy.num_blocks)],
        "settings": dict(strategy.run_settings()),
        "next_round": min(pending) if pending else trainer.current_epoch,
        "resume_epoch": trainer.current_epoch,
        "weights_sha256": weights_fingerprint(
            (name, p) for name, p in trainer.lightning_module.named_parameters() if name in trainable
        ),
    }


def round_records(trainer: "pl.Trainer") -> list[dict[str, Any]]:
    """This site's round records so far (its own clients' compute, its waits), as ``ParaBlockCallback`` keeps them."""
    callback = next((c for c in trainer.callbacks if isinstance(c, ParaBlockCallback)), None)
    return [] if callback is None else [asdict(record) for record in list(callback.records)]
