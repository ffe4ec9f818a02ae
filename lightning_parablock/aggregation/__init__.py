"""How the server combines a round's client deltas: pure rules, the one non-finite policy, one class per rule."""

from lightning_parablock.aggregation.aggregator import AggregateResult, Aggregator
from lightning_parablock.aggregation.mean import MeanAggregator
from lightning_parablock.aggregation.median import MedianAggregator
from lightning_parablock.aggregation.stacking import StackingAggregator
from lightning_parablock.aggregation.trimmed_mean import TrimmedMeanAggregator

__all__ = [
    "AggregateResult",
    "Aggregator",
    "MeanAggregator",
    "MedianAggregator",
    "StackingAggregator",
    "TrimmedMeanAggregator",
]
