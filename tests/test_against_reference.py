"""The Lightning run agrees parameter by parameter with the literal plain-PyTorch Algorithm 2."""

import pytest
from helpers import lightning_and_reference, max_abs_diff


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("num_clients", [1, 3])
@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_matches_reference(staleness, num_clients, optimizer):
    module, reference, _, _ = lightning_and_reference(staleness, num_clients, optimizer)
    assert max_abs_diff(module, reference.global_model) <= 1e-6
    assert max_abs_diff(module, module.__class__()) > 1e-3  # training moved the model


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_matches_reference_with_partial_participation_and_sample_weights(staleness):
    module, reference, strategy, _ = lightning_and_reference(
        staleness, num_clients=5, optimizer="adamw", rounds=5, clients_per_round=2, weighting="samples"
    )
    assert {len(strategy.plan.participants_of(t)) for t in range(5)} == {2}
    assert len({tuple(strategy.plan.participants_of(t)) for t in range(5)}) > 1
    assert max_abs_diff(module, reference.global_model) <= 1e-6


def test_matches_reference_with_accumulation_and_global_lr():
    module, reference, _, _ = lightning_and_reference(1, 3, "sgd", accumulate=2, global_lr=0.5)
    assert max_abs_diff(module, reference.global_model) <= 1e-6
