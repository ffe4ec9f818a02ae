"""Deprecated: the names this module held moved to :mod:`.transport` and :mod:`.in_memory` (0.2); removed in 0.3."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from typing import Any, Optional

from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.comm.transport import CommunicationError, ExchangeResult, RoundUploads

_MOVED = {"RoundExchange": ExchangeResult, "CommunicationError": CommunicationError}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        new = _MOVED[name]
        warnings.warn(
            f"`lightning_parablock.comm.exchange.{name}` moved to `{new.__module__}.{new.__name__}`; the old name is"
            " removed in 0.3.",
            FutureWarning,
            stacklevel=2,
        )
        return new
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def exchange(
    round_index: int,
    block: int,
    deltas: Mapping[int, Mapping[str, Any]],
    weights: Mapping[int, float],
    link: SimulatedLink,
    aggregator: Optional[Aggregator] = None,
    stop: Optional[threading.Event] = None,
) -> ExchangeResult:
    """Deprecated: ``InMemoryTransport(aggregator, link).exchange(RoundUploads(...), stop)``."""
    from lightning_parablock.aggregation.mean import MeanAggregator
    from lightning_parablock.comm.in_memory import InMemoryTransport

    warnings.warn(
        "`lightning_parablock.comm.exchange.exchange(...)` is deprecated: use"
        " `InMemoryTransport(aggregator, link).exchange(RoundUploads(...), stop)` from"
        " `lightning_parablock.comm.in_memory`; removed in 0.3.",
        FutureWarning,
        stacklevel=2,
    )
    transport = InMemoryTransport(aggregator or MeanAggregator(), link)
    return transport.exchange(RoundUploads(round_index, block, dict(deltas), dict(weights)), stop or threading.Event())
