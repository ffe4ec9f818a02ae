"""Where the Flower transport meets the rest of the library: the strategy, ParaBlockCallback and the aggregator.

A Flower site is a one-process Trainer that hosts the clients placed on its site index (as a rank hosts those
placed on its rank), exchanges through its mailbox instead of in memory, and records its own clients only (the
server merges the sites' records). Everything that reaches into the strategy and the callback for that is here,
so that a change of the library's exchange contract changes this module only.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, Union

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.callbacks.parablock import ParaBlockCallback
from lightning_parablock.comm.codecs import EncodedTensor
from lightning_parablock.comm.exchange import RoundExchange
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.comm.worker import CommWorker
from lightning_parablock.core.planning import place_clients
from lightning_parablock.flower.arrays import BlockLayout, codec_on_the_wire
from lightning_parablock.flower.handshake import Hello, weights_fingerprint
from lightning_parablock.flower.site_transport import FlowerSiteTransport
from lightning_parablock.strategies.federated_block import FederatedBlockStrategy
from lightning_parablock.telemetry.timeline import RoundRecord

if TYPE_CHECKING:
    import lightning.pytorch as pl


class Site(Protocol):
    """What the wiring needs of a site (``FlowerSite``)."""

    site: int
    num_sites: int

    def new_transport(self) -> FlowerSiteTransport: ...

    def describe_silence(self) -> str: ...


def aggregator_settings(aggregator: Aggregator) -> dict[str, Any]:
    """What the server builds the same aggregator from (JSON)."""
    if type(aggregator) is not Aggregator:
        raise ValueError(
            f"The Flower server rebuilds the sites' aggregator from its settings; it knows `Aggregator(...)` (mean,"
            f" median, trimmed mean), got {aggregator!r}."
        )
    return {
        "method": aggregator.method,
        "clip_norm": aggregator.clip_norm,
        "trim_fraction": aggregator.trim_fraction,
        "nonfinite": aggregator.nonfinite,
    }


def aggregator_from_settings(settings: Mapping[str, Any]) -> Aggregator:
    """The aggregator a site described with :func:`aggregator_settings`."""
    return Aggregator(**settings)


class TransportCall:
    """:class:`FlowerSiteTransport` as the communication thread calls a transport."""

    def __init__(self, transport: FlowerSiteTransport) -> None:
        self.transport = transport

    def __call__(
        self,
        round_index: int,
        block: int,
        deltas: Mapping[int, Mapping[str, Union[Tensor, EncodedTensor]]],
        weights: Mapping[int, float],
        link: SimulatedLink,
        aggregator: Aggregator,
        stop: threading.Event,
    ) -> RoundExchange:
        return self.transport.exchange(round_index, block, deltas, weights, stop)


@dataclass
class SiteParts:
    """What a site needs from its Trainer's strategy and ParaBlockCallback."""

    trainer: "pl.Trainer"
    strategy: FederatedBlockStrategy
    parablock: ParaBlockCallback
    site: Site
    codec_name: str

    @property
    def comm_timeout(self) -> float:
        return self.parablock.comm_timeout

    def layout(self, block: int) -> BlockLayout:
        federation = self.strategy.federation
        return [(name, p.shape) for name, p in federation.partition.parameters(federation.model, block).items()]

    def records(self) -> list[dict[str, Any]]:
        """This site's round records so far (its own clients' compute, its waits)."""
        return [asdict(record) for record in list(self.parablock.records)]

    def hello(self) -> Hello:
        """This site's answer to the handshake (see :func:`~.handshake.check_hellos`)."""
        strategy, trainer = self.strategy, self.trainer
        federation = strategy.federation
        trainable = strategy.turns.trainable
        pending = federation.pending_rounds()
        return {
            "site": self.site.site,
            "num_sites": self.site.num_sites,
            "library_version": importlib.metadata.version("lightning_parablock"),
            "num_clients": strategy.options.num_clients,
            "placement": list(strategy.placement),
            "rounds": trainer.max_epochs,
            "staleness": self.parablock.staleness,
            "codec": self.codec_name,
            "aggregator": aggregator_settings(self.parablock.aggregator),
            "comm_timeout": self.parablock.comm_timeout,
            "layout": [[[name, list(shape)] for name, shape in self.layout(b)] for b in range(len(strategy.partition))],
            "settings": dict(strategy.run_settings()),
            "next_round": min(pending) if pending else trainer.current_epoch,
            "resume_epoch": trainer.current_epoch,
            "weights_sha256": weights_fingerprint(
                (name, p) for name, p in strategy.lightning_module.named_parameters() if name in trainable
            ),
        }


def site_parts(trainer: "pl.Trainer", site: Site) -> SiteParts:
    """Check that ``trainer`` can be a Flower site and make its strategy one (called at the site's ``setup``,
    after the strategy placed its processes and before it builds the federation or loads a checkpoint)."""
    strategy = trainer.strategy
    if not isinstance(strategy, FederatedBlockStrategy):
        raise MisconfigurationException(f"FlowerSite needs `Trainer(strategy=FederatedBlockStrategy(...))`, got {type(strategy).__name__}.")
    parablock = next((c for c in trainer.callbacks if isinstance(c, ParaBlockCallback)), None)
    if parablock is None:
        raise MisconfigurationException("FlowerSite needs `ParaBlockCallback(...)` among the Trainer's callbacks.")
    if strategy.distributed:
        raise MisconfigurationException(
            f"A Flower site is one process; this Trainer runs {strategy.world_size} (devices × num_nodes): give each"
            " site one device, or make each process a site of its own."
        )
    if trainer.max_steps != -1 or trainer.max_epochs is None or trainer.max_epochs < 1:
        raise MisconfigurationException(
            "Flower sites end by rounds: set `max_epochs` (the same on every site) and leave `max_steps` unset,"
            f" got max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}."
        )
    link = parablock.link
    if link.bandwidth is not None or link.transfer_seconds(0) > 0:
        raise MisconfigurationException(
            f"The Flower transport's link is real and measured; remove ParaBlockCallback's modelled `link` ({link!r})."
        )
    aggregator_settings(parablock.aggregator)
    parts = SiteParts(trainer, strategy, parablock, site, codec_on_the_wire(parablock.codec))
    _place_clients_by_site(strategy, site)
    return parts


def _place_clients_by_site(strategy: FederatedBlockStrategy, site: Site) -> None:
    """The strategy plans, exchanges, records and checkpoints as site ``site.site`` of ``site.num_sites``."""
    num_clients, seed = strategy.options.num_clients, strategy.options.seed
    strategy.placement = place_clients(num_clients, site.num_sites, seed)
    plan_class = strategy.plan_class
    strategy.plan_class = lambda *args: plan_class(*args[:5], site.num_sites, site.site)
    new_exchange = strategy.new_exchange

    def site_exchange(*args: Any, **kwargs: Any) -> Any:
        exchange = new_exchange(*args, **kwargs)

        def comm_worker(link: SimulatedLink, aggregator: Aggregator, timeout_s: float) -> CommWorker:
            transport = TransportCall(site.new_transport())
            describe = lambda round_index: site.describe_silence()  # noqa: E731
            return CommWorker(link, timeout_s, aggregator, transport=transport, describe_stall=describe, device=exchange.device)

        def merge_round_record(record: RoundRecord) -> RoundRecord:
            record.rank = site.site  # this site's clients only: the server merges the sites' records
            return record

        exchange.comm_worker, exchange.merge_round_record = comm_worker, merge_round_record
        return exchange

    strategy.new_exchange = site_exchange
    checkpoint = strategy.checkpoint
    entry, read = checkpoint.entry, checkpoint.read

    def site_entry(*args: Any) -> Any:
        saved = entry(*args[:4], 1, *args[5:])  # this process's clients, gathered from no one
        if saved is not None:
            saved.update(world_size=site.num_sites, site=site.site)
        return saved

    def site_read(saved: Any, path: Any, num_clients: int, world_size: int, *rest: Any) -> None:
        if saved is not None and saved.get("site", site.site) != site.site:
            raise MisconfigurationException(f"The checkpoint {path} is site {saved['site']}'s; this is site {site.site}.")
        read(saved, path, num_clients, site.num_sites, *rest)

    checkpoint.entry, checkpoint.read = site_entry, site_read
