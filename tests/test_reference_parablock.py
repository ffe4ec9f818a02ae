"""Tests of the independent ParaBlock reference (tests/reference_parablock.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

try:  # works whether or not tests/ is a package
    from tests.reference_parablock import RoundSpec, run_reference
except ImportError:  # pragma: no cover
    from reference_parablock import RoundSpec, run_reference

ATOL = 1e-6
IN, HID, OUT = 4, 6, 2


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HID)
        self.fc2 = torch.nn.Linear(HID, HID)
        self.fc3 = torch.nn.Linear(HID, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


BLOCKS = [
    ["fc1.weight", "fc1.bias"],
    ["fc2.weight", "fc2.bias"],
    ["fc3.weight", "fc3.bias"],
]


def make_model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def adamw(params):
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)


def make_batches(gen: torch.Generator, n: int, bs: int = 3):
    return [(torch.randn(bs, IN, generator=gen), torch.randn(bs, OUT, generator=gen)) for _ in range(n)]


def cyclic_rounds(num_rounds, participants_per_round, n_micro, seed=0, same_data=False):
    """Rounds cycling through BLOCKS (consecutive blocks disjoint)."""
    gen = torch.Generator().manual_seed(seed)
    rounds = []
    for t in range(num_rounds):
        parts = participants_per_round[t]
        shared = make_batches(gen, n_micro)
        batches = {i: (shared if same_data else make_batches(gen, n_micro)) for i in parts}
        rounds.append(RoundSpec(block=BLOCKS[t % len(BLOCKS)], batches=batches))
    return rounds


def params_of(sd_or_model):
    if isinstance(sd_or_model, torch.nn.Module):
        return {k: v.detach() for k, v in sd_or_model.named_parameters()}
    return sd_or_model


def assert_close(a, b, atol=ATOL):
    a, b = params_of(a), params_of(b)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=0, msg=k)


# ---------------------------------------------------------------------------
# N = 1, s = 1, eta = 1  ==  centralised block-coordinate training
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [sgd, adamw], ids=["sgd", "adamw"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_single_client_equals_centralized_bcd(factory, accumulate):
    rounds = cyclic_rounds(5, [[0]] * 5, n_micro=3 * accumulate, seed=1)
    model = make_model()
    init = copy.deepcopy(model.state_dict())
    res = run_reference(model, loss_fn, rounds, 1, factory, staleness=1, accumulate=accumulate)

    # hand-written centralised block-coordinate loop
    central = copy.deepcopy(model)
    for spec in rounds:
        for name, p in central.named_parameters():
            p.requires_grad_(name in spec.block)
            p.grad = None
        opt = factory([p for n, p in central.named_parameters() if n in spec.block])
        for k, batch in enumerate(spec.batches[0]):
            (loss_fn(central, batch) / accumulate).backward()
            if (k + 1) % accumulate == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)

    assert_close(res.global_model, central)
    assert_close(res.client_models[0], central)
    # the input model is never modified
    assert_close(model.state_dict(), init, atol=0)
    # training actually moved every block
    for name, p in central.named_parameters():
        assert not torch.equal(p.detach(), init[name]), name


# ---------------------------------------------------------------------------
# identical data on every client: FedBCD (s=0) == ParaBlock (s=1) == s=2
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [sgd, adamw], ids=["sgd", "adamw"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_identical_data_staleness_invariant(factory, eta):
    n = 3
    rounds = cyclic_rounds(6, [list(range(n))] * 6, n_micro=2, seed=2, same_data=True)
    results = [
        run_reference(make_model(), loss_fn, rounds, n, factory, staleness=s, global_lr=eta)
        for s in (0, 1, 2)
    ]
    for r in results[1:]:
        assert_close(r.global_model, results[0].global_model)
    for r in results:  # every client ends on the global model
        for c in r.client_models:
            assert_close(c, r.global_model)


# ---------------------------------------------------------------------------
# s = 1: after boundary t, block b_{t-1} of every client == global (Eq. 3 = Eq. 4)
# ---------------------------------------------------------------------------
def test_stale_block_synchronised_after_boundary():
    n, T = 3, 6
    rounds = cyclic_rounds(T, [list(range(n))] * T, n_micro=2, seed=3)
    res = run_reference(make_model(), loss_fn, rounds, n, adamw, staleness=1)
    assert len(res.snapshots) == T and all(len(s) == n for s in res.snapshots)
    assert len(res.global_snapshots) == T
    for t in range(1, T):
        g = res.global_snapshots[t]
        for j in range(n):
            for name in rounds[t - 1].block:
                torch.testing.assert_close(res.snapshots[t][j][name], g[name], atol=ATOL, rtol=0)
        # the block trained in round t still differs between clients (different data)
        a, b = res.snapshots[t][0], res.snapshots[t][1]
        assert any(not torch.allclose(a[nm], b[nm]) for nm in rounds[t].block)


# ---------------------------------------------------------------------------
# invariant: client_j == global + eta * sum of j's not-yet-aggregated deltas
# ---------------------------------------------------------------------------
def check_invariant(rounds, n, staleness, eta, weights=None, factory=sgd, seed=0):
    """Recompute each client's own pending deltas from snapshots and check the invariant."""
    model = make_model(seed)
    res = run_reference(model, loss_fn, rounds, n, factory, staleness=staleness,
                        global_lr=eta, client_weights=weights)
    T = len(rounds)
    # Own delta of client j in round t, recomputed independently: retrain from the
    # state client j had before round t (snapshot t-1 or the initial model).
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    own = [dict() for _ in range(T)]
    for t, spec in enumerate(rounds):
        for j in spec.batches:
            start = init if t == 0 else res.snapshots[t - 1][j]
            m = copy.deepcopy(model)
            m.load_state_dict(start)
            before = {k: v.detach().clone() for k, v in m.named_parameters()}
            for name, p in m.named_parameters():
                p.requires_grad_(name in spec.block)
            opt = factory([p for nm, p in m.named_parameters() if nm in spec.block])
            for batch in spec.batches[j]:
                loss_fn(m, batch).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            after = dict(m.named_parameters())
            own[t][j] = {nm: after[nm].detach() - before[nm] for nm in spec.block}

    for t in range(T):
        g = res.global_snapshots[t]
        for j in range(n):
            expected = {k: g[k].clone() for k in g}
            for r in range(max(0, t - staleness + 1), t + 1):  # pending rounds t-s+1..t
                for nm, d in own[r].get(j, {}).items():
                    expected[nm] += eta * d
            assert_close(res.snapshots[t][j], expected)
    # after the flush nothing is pending: every client equals the global model
    for c in res.client_models:
        assert_close(c, res.global_model)
    return res


@pytest.mark.parametrize("staleness", [0, 1, 2, 3])
@pytest.mark.parametrize("eta", [1.0, 0.7])
def test_invariant_full_participation(staleness, eta):
    rounds = cyclic_rounds(5, [[0, 1, 2]] * 5, n_micro=2, seed=4)
    check_invariant(rounds, 3, staleness, eta)


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_invariant_partial_participation_and_weights(staleness):
    parts = [[0, 2], [1], [0, 1, 3], [2, 3], [3], [0, 1, 2, 3]]
    rounds = cyclic_rounds(len(parts), parts, n_micro=2, seed=5)
    res = check_invariant(rounds, 4, staleness, 0.8, weights=[10, 30, 5, 55])
    # every client's final model equals the global one, which is not the initial model
    init = make_model(0)
    assert any(not torch.allclose(p, q) for p, q in zip(res.global_model.parameters(), init.parameters()))


def test_sample_count_weights_aggregate():
    """One round, s=1, eta=1: global = init + sum_i (n_i / sum n) Delta^i."""
    n, w = 3, [1.0, 2.0, 7.0]
    rounds = cyclic_rounds(1, [[0, 1, 2]], n_micro=2, seed=6)
    model = make_model()
    res = run_reference(model, loss_fn, rounds, n, sgd, staleness=1, client_weights=w)
    # before the flush each client holds its own local result
    init = dict(model.named_parameters())
    expected = {k: v.detach().clone() for k, v in init.items()}
    for j in range(n):
        local = res.snapshots[0][j]
        for nm in rounds[0].block:
            expected[nm] += w[j] / sum(w) * (local[nm] - init[nm].detach())
    assert_close(res.global_model, expected)
    # partial participation: the normalisation runs over the participants only,
    # and the non-participant receives the aggregate at the boundary too
    rounds2 = cyclic_rounds(1, [[0, 2]], n_micro=2, seed=6)
    res2 = run_reference(model, loss_fn, rounds2, n, sgd, staleness=1, client_weights=w)
    expected2 = {k: v.detach().clone() for k, v in init.items()}
    for j in (0, 2):
        local = res2.snapshots[0][j]
        for nm in rounds2[0].block:
            expected2[nm] += w[j] / (w[0] + w[2]) * (local[nm] - init[nm].detach())
    assert_close(res2.global_model, expected2)
    assert_close(params_of(res2.snapshots[0][1]), dict(init))  # untouched before the flush
    for c in res2.client_models:
        assert_close(c, res2.global_model)


@settings(max_examples=12, deadline=None)
@given(
    staleness=st.integers(0, 3),
    data=st.data(),
)
def test_invariant_random_participation(staleness, data):
    n = 3
    T = data.draw(st.integers(max(staleness, 1), 5))
    parts = [sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1))) for _ in range(T)]
    weights = data.draw(st.one_of(st.none(), st.lists(st.integers(1, 20), min_size=n, max_size=n)))
    eta = data.draw(st.sampled_from([1.0, 0.5, 1.5]))
    rounds = cyclic_rounds(T, parts, n_micro=1, seed=7)
    check_invariant(rounds, n, staleness, eta, weights=weights)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
def test_errors():
    rounds = cyclic_rounds(2, [[0, 1]] * 2, n_micro=2)
    with pytest.raises(ValueError, match="staleness"):
        run_reference(make_model(), loss_fn, rounds, 2, sgd, staleness=-1)
    with pytest.raises(ValueError, match="staleness"):
        run_reference(make_model(), loss_fn, rounds, 2, sgd, staleness=3)
    bad = [RoundSpec(block=["fc1.weight", "nope.weight"], batches=rounds[0].batches)]
    with pytest.raises(ValueError, match="unknown"):
        run_reference(make_model(), loss_fn, bad, 2, sgd, staleness=1)
    with pytest.raises(ValueError, match="accumulate"):
        run_reference(make_model(), loss_fn, cyclic_rounds(1, [[0]], n_micro=3), 1, sgd,
                      staleness=0, accumulate=2)
    # staleness == number of rounds is allowed (everything is applied at the flush)
    res = run_reference(make_model(), loss_fn, rounds, 2, sgd, staleness=2)
    for c in res.client_models:
        assert_close(c, res.global_model)
