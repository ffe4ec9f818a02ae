"""Robust aggregation and the non-finite policy, alone and inside a run."""

import math

import pytest
import torch
from helpers import quiet_trainer
from lightning import Callback
from toy import ToyModule, toy_dataset, toy_loader

from lightning_parablock import (
    Aggregator,
    FederatedBlockStrategy,
    MeanAggregator,
    MedianAggregator,
    ParaBlockCallback,
    TrimmedMeanAggregator,
)
from lightning_parablock.aggregation.nonfinite import NonFiniteDeltaError, all_finite
from lightning_parablock.aggregation.rules import clip_by_norm


def honest_and_one_attacker(num_honest=6):
    """Honest clients near 1.0, one client sending a delta a million times larger."""
    generator = torch.Generator().manual_seed(0)
    deltas = {c: {"w": 1.0 + 0.01 * torch.randn(50, generator=generator)} for c in range(num_honest)}
    deltas[num_honest] = {"w": torch.full((50,), 1e6)}
    weights = {c: 1 / len(deltas) for c in deltas}
    return deltas, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("at", [0, 4097, -1])
def test_all_finite_finds_one_bad_value_anywhere(dtype, bad, at):
    values = torch.linspace(-3e4, 3e4, 10_000, dtype=dtype)  # within fp16's range
    assert all_finite(values)
    values[at] = bad
    assert not all_finite(values)


def test_all_finite_on_empty_and_integer_tensors():
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(5)) and all_finite(torch.zeros(2, 0, 3))


def test_all_finite_on_complex_and_float8_tensors():
    values = torch.zeros(6, dtype=torch.complex64)
    assert all_finite(values)
    values[3] = complex(0.0, math.nan)
    assert not all_finite(values)
    eight = torch.zeros(4).to(torch.float8_e5m2)
    assert all_finite(eight)
    eight[1] = math.inf
    assert not all_finite(eight)


@pytest.mark.parametrize(
    "aggregator",
    [MedianAggregator(), TrimmedMeanAggregator(trim_fraction=0.2), MeanAggregator(clip_norm=10.0)],
    ids=["median", "trimmed_mean", "clipped_mean"],
)
def test_robust_rules_resist_one_huge_delta(aggregator):
    deltas, weights = honest_and_one_attacker()
    assert MeanAggregator()(deltas, weights).aggregate["w"].abs().max() > 1e5  # the plain mean is poisoned
    robust = aggregator(deltas, weights).aggregate["w"]
    bound = 2.5 if aggregator.clip_norm else 0.05  # clipping bounds the attacker's pull, the others remove it
    assert (robust - 1.0).abs().max() < bound


def test_clipping_scales_the_whole_block_to_the_norm():
    clipped = clip_by_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, max_norm=1.0)
    assert torch.allclose(torch.cat(list(clipped.values())), torch.tensor([0.6, 0.8]))
    small = {"a": torch.tensor([0.1])}
    assert torch.equal(clip_by_norm(small, 1.0)["a"], small["a"])


def test_skip_policy_leaves_the_bad_client_out_and_renormalizes():
    deltas = {0: {"w": torch.tensor([1.0])}, 1: {"w": torch.tensor([math.inf])}, 2: {"w": torch.tensor([3.0])}}
    result = MeanAggregator(nonfinite="skip")(deltas, {0: 0.25, 1: 0.5, 2: 0.25})
    assert result.skipped_clients == [1]
    assert torch.allclose(result.aggregate["w"], torch.tensor([2.0]))
    with pytest.raises(NonFiniteDeltaError, match="Client 1 .*nonfinite='skip'"):
        MeanAggregator()(deltas, {0: 0.25, 1: 0.5, 2: 0.25})
    with pytest.raises(NonFiniteDeltaError, match="Every client"):
        MeanAggregator(nonfinite="skip")({1: deltas[1]}, {1: 1.0})


def test_the_old_configurable_aggregator_builds_the_rules_class_and_says_so():
    with pytest.warns(FutureWarning, match=r"Aggregator\(method='median', ...\)` is deprecated.*MedianAggregator"):
        built = Aggregator(method="median", clip_norm=2.0, nonfinite="skip")
    assert type(built) is MedianAggregator and (built.clip_norm, built.nonfinite) == (2.0, "skip")
    with pytest.warns(FutureWarning):
        assert type(Aggregator()) is MeanAggregator and type(Aggregator("trimmed_mean")) is TrimmedMeanAggregator


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "mode"}, "'mode'"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"trim_fraction": 0.5}, "trim_fraction"),
        ({"nonfinite": "ignore"}, "'ignore'"),
    ],
)
def test_aggregator_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Aggregator(**kwargs)


class PoisonOneClient(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            next(iter(trainer.strategy.federation.clients[1].pending[1].tensors.values())).fill_(math.nan)


def test_a_non_finite_client_is_skipped_in_a_run_and_never_reaches_the_global_model():
    module = ToyModule()
    callback = ParaBlockCallback(staleness=1, aggregator=MeanAggregator(nonfinite="skip"))
    trainer = quiet_trainer(
        strategy=FederatedBlockStrategy(num_clients=3, local_steps=2),
        callbacks=[PoisonOneClient(), callback],
        max_epochs=4,
    )
    with pytest.warns(UserWarning, match=r"Round 1: left clients \[1\] out"):
        trainer.fit(module, toy_loader(toy_dataset()))
    assert [r.skipped_clients for r in callback.records] == [[], [], [1], [], []]
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(torch.isfinite(v).all() for c in range(3) for v in trainer.strategy.federation.client_view(c).values())
