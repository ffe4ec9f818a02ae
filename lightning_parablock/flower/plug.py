"""Where the Flower transport meets the rest of the library: the aggregator's description and the transport's call.

Kept in one place so that a change of the library's exchange contract changes this module only.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Union

from torch import Tensor

from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.comm.codecs import EncodedTensor
from lightning_parablock.comm.exchange import RoundExchange
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.flower.site_transport import FlowerSiteTransport


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
    """:class:`FlowerSiteTransport` as the communication thread calls a transport today."""

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
