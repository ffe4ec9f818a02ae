"""Property: for random federations, the one-model bookkeeping gives the literal per-client models."""

import torch
from helpers import lightning_and_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_invariants import ViewRecorder


@st.composite
def federations(draw):
    num_clients = draw(st.integers(1, 4))
    rounds = draw(st.integers(2, 5))
    return dict(
        num_clients=num_clients,
        rounds=rounds,
        staleness=draw(st.integers(0, rounds - 1)),
        clients_per_round=draw(st.integers(1, num_clients)),
        weighting=draw(st.sampled_from(["uniform", "samples"])),
        global_lr=draw(st.sampled_from([1.0, 0.5, 1.5])),
        optimizer=draw(st.sampled_from(["sgd", "adamw"])),
        local_steps=draw(st.integers(1, 2)),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(federations())
def test_client_views_and_global_equal_the_literal_algorithm(federation):
    recorder = ViewRecorder()
    module, reference, _, _ = lightning_and_reference(extra_callbacks=[recorder], **federation)
    assert max(
        (p.detach() - dict(reference.global_model.named_parameters())[n].detach()).abs().max().item()
        for n, p in module.named_parameters()
    ) <= 1e-5
    for t in range(federation["rounds"]):
        for j in range(federation["num_clients"]):
            for name, value in recorder.views[t][j].items():
                assert torch.allclose(value, reference.snapshots[t][j][name], atol=1e-5, rtol=0), (t, j, name)
