"""How a run's rounds are exchanged: one frozen object the strategy receives once, checks and owns.

``ParaBlockCallback`` builds an :class:`ExchangeSpec` from its arguments and hands it to
``FederatedBlockStrategy.configure_exchange`` at setup; a run without the callback can hand one itself. Everything
about an exchange that is not the federation's (clients, blocks, rounds: the strategy's options) is here: when a
round's deltas are exchanged (the staleness), how they are combined (the aggregator), how they travel (the codec
and the transport) and how long a wait may take. The strategy records what defines the run in its checkpoints
(:meth:`ExchangeSpec.run_settings`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Optional, Union

from lightning_parablock.aggregation.aggregator import Aggregator, Weighting
from lightning_parablock.aggregation.mean import MeanAggregator
from lightning_parablock.argument_checks import check_int, check_positive
from lightning_parablock.comm.by_processes import ByProcesses
from lightning_parablock.comm.codecs import Codec
from lightning_parablock.comm.link import SimulatedLink, parse_duration
from lightning_parablock.comm.transport import TransportChoice
from lightning_parablock.strategies.run_settings import RunSettings


@dataclass(frozen=True)
class ExchangeSpec:
    """The exchange of a federated run.

    Args:
        staleness: rounds between training a block and aggregating it (0: FedBCD, 1: ParaBlock, k: the paper's
            multi-round staleness).
        aggregator: the server's rule (:class:`~lightning_parablock.aggregation.mean.MeanAggregator` by default).
        codec: how a client's delta is encoded for the upload (:class:`~lightning_parablock.comm.codecs.Codec`, fp32).
        link: the modelled link whose time an exchange takes at least (infinitely fast by default).
        comm_timeout: longest wait for one exchange at a round boundary, in seconds or as a string such as ``"90s"``.
        transport: which transport carries the exchange (:class:`~lightning_parablock.comm.by_processes.ByProcesses`:
            in memory with one process, collectives with several).
        method: the name of the paper's Table 1 method these settings are, when one is (``ParaBlockCallback`` fills
            it in at setup); recorded in checkpoints so that a resume as another method is refused naming both.
    """

    staleness: int = 1
    aggregator: Aggregator = field(default_factory=MeanAggregator)
    codec: Codec = field(default_factory=Codec)
    link: SimulatedLink = field(default_factory=SimulatedLink)
    comm_timeout: Union[float, str] = 1800.0
    transport: TransportChoice = field(default_factory=ByProcesses)
    method: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "staleness", check_int("staleness (0 = FedBCD, 1 = ParaBlock)", self.staleness, minimum=0))
        timeout = parse_duration(self.comm_timeout, "comm_timeout")  # seconds, or a string such as "90s"
        object.__setattr__(self, "comm_timeout", check_positive("comm_timeout", timeout))
        expected = {
            "aggregator": (Aggregator, "an Aggregator such as `MeanAggregator()` or `MedianAggregator()`"),
            "codec": (Codec, "a Codec such as `Int8Codec()`, or a name given to ParaBlockCallback(compression=...)"),
            "link": (SimulatedLink, "a SimulatedLink, e.g. `SimulatedLink(bandwidth='100MB/s')`"),
            "transport": (TransportChoice, "a TransportChoice such as `ByProcesses()`"),
        }
        for name, (kind, example) in expected.items():
            value = getattr(self, name)
            if not isinstance(value, kind):
                raise TypeError(f"`{name}` must be {example}, got {value!r}.")
        rule = type(self.aggregator)
        if rule.reduces_from_partial_sums and rule.accumulate is Aggregator.accumulate:
            raise TypeError(
                f"{rule.__name__} says it `reduces_from_partial_sums` but has no `accumulate`: ranks could not add their"
                " clients in parts. Implement `accumulate(total, deltas, weights)`, or leave `reduces_from_partial_sums`"
                " False and every delta is gathered."
            )

    def run_settings(self) -> RunSettings:
        """What of the exchange defines the run: another staleness, rule or codec would train another run from a
        checkpoint's pending deltas (a top-k checkpoint resumed without top-k would drop every residual). The link,
        the timeout and the transport are safe to change (the number of processes is compared on its own)."""
        return {
            "method": self.method,
            "staleness": self.staleness,
            "compression": repr(self.codec),
            "aggregator": repr(self.aggregator),
            "weighting": self.aggregator.weighting,
        }


def with_strategy_weighting(spec: ExchangeSpec, weighting: Optional[Weighting]) -> ExchangeSpec:
    """``spec`` with the deprecated ``FederatedBlockStrategy(weighting=...)`` applied to its aggregator.

    An aggregator left at uniform weights takes the strategy's; one set to other weights, or a rule without weights
    (median, trimmed mean) asked for sample counts, is refused: which one counts would be a guess.
    """
    aggregator = spec.aggregator
    if weighting is None or weighting == aggregator.weighting:
        return spec
    if "weighting" not in aggregator.settings():
        raise ValueError(
            f"`FederatedBlockStrategy(weighting={weighting!r})` but the aggregator {aggregator!r} uses no weights."
            " Remove `weighting` from the strategy."
        )
    if aggregator.weighting != "uniform":
        raise ValueError(
            f"`FederatedBlockStrategy(weighting={weighting!r})` contradicts the aggregator's {aggregator!r}. Give the"
            " weighting to the aggregator only."
        )
    weighted = copy.copy(aggregator)
    weighted.weighting = weighting
    return replace(spec, aggregator=weighted)
