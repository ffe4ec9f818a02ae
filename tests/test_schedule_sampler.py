"""Block schedules, participant sampling, the federated batch sampler, clients and aggregation weights."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_parablock.aggregation.mean import MeanAggregator
from lightning_parablock.aggregation.nonfinite import NonFiniteDeltaError
from lightning_parablock.aggregation.rules import weighted_sum
from lightning_parablock.core.clients import BlockDelta, VirtualClient
from lightning_parablock.core.planning import participants_per_round, sample_participants
from lightning_parablock.core.rng import seeded_generator
from lightning_parablock.core.sampler import ClientTurn, FederatedBatchSampler
from lightning_parablock.core.schedule import BlockSchedule
from lightning_parablock.core.sizes import optimizer_state_nbytes

# --------------------------------------------------------------------------- block schedule


def test_random_schedule_is_seeded_and_deterministic():
    a = [BlockSchedule("random", 6, seed=1).block_for_round(t) for t in range(100)]
    b = [BlockSchedule("random", 6, seed=1).block_for_round(t) for t in range(100)]
    assert a == b
    # A round's block does not depend on which rounds were asked before (resume mid-run).
    schedule = BlockSchedule("random", 6, seed=1)
    assert [schedule.block_for_round(t) for t in reversed(range(100))] == a[::-1]


def test_random_schedule_ignores_global_rng_state():
    schedule = BlockSchedule("random", 5, seed=3)
    before = [schedule.block_for_round(t) for t in range(30)]
    torch.manual_seed(12345)
    torch.rand(100)
    assert [schedule.block_for_round(t) for t in range(30)] == before


def test_random_schedule_covers_all_blocks_roughly_uniformly():
    num_blocks, rounds = 6, 600
    counts = Counter(BlockSchedule("random", num_blocks, seed=0).block_for_round(t) for t in range(rounds))
    assert set(counts) == set(range(num_blocks))
    expected = rounds / num_blocks
    assert all(0.5 * expected < c < 1.5 * expected for c in counts.values()), counts


def test_random_schedule_differs_for_a_different_seed():
    a = [BlockSchedule("random", 6, seed=0).block_for_round(t) for t in range(50)]
    b = [BlockSchedule("random", 6, seed=1).block_for_round(t) for t in range(50)]
    assert a != b


def test_random_schedule_varies_across_rounds():
    blocks = [BlockSchedule("random", 4, seed=0).block_for_round(t) for t in range(20)]
    assert len(set(blocks)) > 1


def test_sequential_and_reverse_schedules():
    assert [BlockSchedule("sequential", 3).block_for_round(t) for t in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [BlockSchedule("reverse", 3).block_for_round(t) for t in range(7)] == [2, 1, 0, 2, 1, 0, 2]
    assert [BlockSchedule(kind, 1).block_for_round(t) for kind in ("random", "sequential", "reverse") for t in range(3)] == [0] * 9


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"one of \('random', 'sequential', 'reverse', 'permutation', 'spaced', 'gradient'\), got 'cyclic'"):
        BlockSchedule("cyclic", 4)
    with pytest.raises(ValueError, match="at least one block, got 0"):
        BlockSchedule("random", 0)
    with pytest.raises(ValueError, match="Rounds count from 0, got -1"):
        BlockSchedule("sequential", 4).block_for_round(-1)


def test_seeded_generator_depends_on_every_key():
    def draw(*keys):
        return torch.randint(10**9, (1,), generator=seeded_generator(*keys)).item()

    assert draw(1, 2, 3) == draw(1, 2, 3)
    assert len({draw(1, 2, 3), draw(1, 2, 4), draw(1, 3, 3), draw(2, 2, 3), draw(3, 2, 1)}) == 5


# --------------------------------------------------------------------------- participants


def test_sample_participants_is_deterministic_sorted_and_the_right_size():
    for t in range(20):
        chosen = sample_participants(t, num_clients=10, count=4, seed=7)
        assert chosen == sample_participants(t, num_clients=10, count=4, seed=7)
        assert chosen == sorted(chosen)
        assert len(chosen) == len(set(chosen)) == 4
        assert all(0 <= c < 10 for c in chosen)


def test_sample_participants_varies_across_rounds_and_seeds():
    by_round = {tuple(sample_participants(t, 10, 4, seed=0)) for t in range(20)}
    assert len(by_round) > 5
    assert [sample_participants(t, 10, 4, seed=0) for t in range(10)] != [
        sample_participants(t, 10, 4, seed=1) for t in range(10)
    ]
    # Over many rounds every client gets a turn.
    assert set().union(*by_round) == set(range(10))


def test_sample_participants_with_full_participation_is_everyone():
    assert sample_participants(3, 5, 5, seed=0) == [0, 1, 2, 3, 4]
    assert sample_participants(3, 5, 9, seed=0) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "num_clients, participation, clients_per_round, expected",
    [(10, 1.0, None, 10), (10, 0.5, None, 5), (10, 0.01, None, 1), (8, 0.3, None, 2), (10, 0.5, 3, 3), (10, 1.0, 10, 10)],
)
def test_participants_per_round(num_clients, participation, clients_per_round, expected):
    assert participants_per_round(num_clients, participation, clients_per_round) == expected


@pytest.mark.parametrize("participation", [0.0, -0.1, 1.5, float("nan")])
def test_participants_per_round_rejects_participation_outside_unit_interval(participation):
    with pytest.raises(ValueError, match=r"participation.*\(0, 1\]"):
        participants_per_round(10, participation, None)


@pytest.mark.parametrize("clients_per_round", [0, -1, 11])
def test_participants_per_round_rejects_clients_per_round_out_of_range(clients_per_round):
    with pytest.raises(ValueError, match=rf"clients_per_round.*num_clients=10, got {clients_per_round}"):
        participants_per_round(10, 1.0, clients_per_round)


# --------------------------------------------------------------------------- federated batch sampler

SHARD_SIZES = [10, 7, 13, 5]
SHARDS = [[100 * c + k for k in range(size)] for c, size in enumerate(SHARD_SIZES)]


class RoundCounter:
    def __init__(self) -> None:
        self.value = 0

    def __call__(self) -> int:
        return self.value


def make_sampler(seed: int = 0, batch_size: int = 3, batches_per_turn: int = 2, count: int = 2, **kwargs):
    current = RoundCounter()
    sampler = FederatedBatchSampler(
        SHARDS,
        batch_size=batch_size,
        batches_per_turn=batches_per_turn,
        participants=lambda r: sample_participants(r, len(SHARDS), count, seed=seed),
        current_round=current,
        seed=seed,
        **kwargs,
    )
    return sampler, current


def client_stream(sampler: FederatedBatchSampler, client: int, rounds: int) -> list[int]:
    """Everything ``client`` reads over the first ``rounds`` rounds, in order."""
    stream = []
    for t in range(rounds):
        for turn in sampler.plan(t):
            if turn.client == client:
                stream.extend(i for batch in turn.batches for i in batch)
    return stream


def test_len_is_participants_times_batches_per_turn():
    sampler, _ = make_sampler(batches_per_turn=3, count=2)
    assert len(sampler) == 6
    assert len(list(sampler)) == 6


def test_iterating_yields_the_plan_of_the_current_round():
    sampler, current = make_sampler()
    for t in (0, 1, 5):
        current.value = t
        plan = sampler.plan(t)
        assert [turn.client for turn in plan] == sample_participants(t, len(SHARDS), 2, seed=0)
        assert list(sampler) == [list(batch) for turn in plan for batch in turn.batches]
    # The round is read when iteration starts, not when the sampler was built.
    current.value = 0
    first = list(sampler)
    current.value = 1
    assert list(sampler) != first


def test_every_batch_comes_from_its_clients_own_shard():
    sampler, _ = make_sampler()
    for t in range(15):
        for turn in sampler.plan(t):
            assert isinstance(turn, ClientTurn) and len(turn.batches) == 2
            for batch in turn.batches:
                assert len(batch) == 3
                assert set(batch) <= set(SHARDS[turn.client])


def test_a_clients_stream_continues_across_rounds_without_repeats_within_a_pass():
    sampler, _ = make_sampler()
    for client, shard in enumerate(SHARDS):
        stream = client_stream(sampler, client, rounds=40)
        assert len(stream) >= 2 * len(shard), "client trained too rarely for the test to mean anything"
        passes = [stream[i : i + len(shard)] for i in range(0, len(stream) - len(shard) + 1, len(shard))]
        for one_pass in passes:
            assert sorted(one_pass) == sorted(shard)  # each pass is a permutation: nothing repeated or skipped
        assert passes[0] != passes[1], "each pass should be a fresh permutation"


def test_a_client_picks_up_where_its_previous_round_left_off():
    sampler, _ = make_sampler()
    client = 1
    rounds = [t for t in range(30) if client in sample_participants(t, len(SHARDS), 2, seed=0)]
    per_turn = 2 * 3
    stream = client_stream(sampler, client, rounds=30)
    for k, t in enumerate(rounds):
        (turn,) = [turn for turn in sampler.plan(t) if turn.client == client]
        assert [i for b in turn.batches for i in b] == stream[k * per_turn : (k + 1) * per_turn]


def test_plan_is_a_pure_function_of_its_arguments():
    a, _ = make_sampler(seed=4)
    b, _ = make_sampler(seed=4)
    late_first = [b.plan(t) for t in reversed(range(12))][::-1]  # asked in another order, as on resume
    assert [a.plan(t) for t in range(12)] == late_first
    assert a.plan(3) == a.plan(3)
    other, _ = make_sampler(seed=5)
    assert [a.plan(t) for t in range(12)] != [other.plan(t) for t in range(12)]


def test_unshuffled_streams_read_shards_in_order():
    sampler, _ = make_sampler(shuffle=False, count=len(SHARDS))
    stream = client_stream(sampler, 3, rounds=3)  # 3 rounds × 2 batches × 3 samples over a shard of 5
    assert stream == [SHARDS[3][k % 5] for k in range(18)]


def test_empty_shard_and_bad_batch_size_raise():
    with pytest.raises(ValueError, match="Client 1 has an empty data shard"):
        FederatedBatchSampler([[0, 1], [], [2]], 1, 1, lambda r: [0, 1, 2], lambda: 0)
    with pytest.raises(ValueError, match="batch_size` must be at least 1, got 0"):
        FederatedBatchSampler([[0, 1]], 0, 1, lambda r: [0], lambda: 0)


@settings(max_examples=40, deadline=None)
@given(
    shard_size=st.integers(1, 40),
    batch_size=st.integers(1, 8),
    seed=st.integers(0, 2**31),
    shuffle=st.booleans(),
)
def test_consecutive_batches_cover_the_whole_shard(shard_size, batch_size, seed, shuffle):
    """Over ceil(len(shard) / batch_size) consecutive batches, every sample of the shard is seen."""
    shard = list(range(1000, 1000 + shard_size))
    sampler = FederatedBatchSampler(
        [shard], batch_size, batches_per_turn=1, participants=lambda r: [0], current_round=lambda: 0, seed=seed, shuffle=shuffle
    )
    needed = math.ceil(shard_size / batch_size)
    seen = [i for t in range(needed) for i in sampler.plan(t)[0].batches[0]]
    assert set(seen) == set(shard)
    assert len(set(seen[:shard_size])) == shard_size  # the first pass has no repeats


# --------------------------------------------------------------------------- clients and weights


def clients_with(*sizes: int) -> list[VirtualClient]:
    return [VirtualClient(index=i, sample_indices=list(range(n))) for i, n in enumerate(sizes)]


def test_client_state_bytes_count_pending_deltas_and_optimizer_state():
    client = clients_with(5)[0]
    assert client.num_samples == 5 and client.pending_nbytes() == 0
    delta = BlockDelta(round=0, block=1, tensors={"w": torch.zeros(10), "b": torch.zeros(2, dtype=torch.bfloat16)})
    assert delta.nbytes == 10 * 4 + 2 * 2
    client.pending[0] = delta
    param = torch.nn.Parameter(torch.zeros(6))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(6)
    optimizer.step()
    # AdamW keeps exp_avg and exp_avg_sq (6 fp32 each) and a scalar step tensor.
    step_bytes = optimizer.state[param]["step"].numel() * optimizer.state[param]["step"].element_size()
    assert client.pending_nbytes() == delta.nbytes
    assert optimizer_state_nbytes(optimizer) == 2 * 6 * 4 + step_bytes


# --------------------------------------------------------------------------- weighted mean


def test_weighted_sum_math():
    deltas = {
        0: {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(4.0)},
        2: {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor(0.0)},
    }
    out = weighted_sum(deltas, {0: 0.25, 2: 0.75})
    torch.testing.assert_close(out["w"], torch.tensor([0.25 + 2.25, 0.5 - 1.5]))
    torch.testing.assert_close(out["b"], torch.tensor(1.0))
    assert list(out) == ["w", "b"]
    # The inputs are left as they were.
    torch.testing.assert_close(deltas[0]["w"], torch.tensor([1.0, 2.0]))


def test_weighted_sum_of_one_client_with_weight_one_is_its_delta():
    delta = {"w": torch.randn(3, 4)}
    torch.testing.assert_close(weighted_sum({5: delta}, {5: 1.0})["w"], delta["w"])


def test_weighted_sum_accumulates_in_fp32():
    # 1 + 2^-9 is not representable in bf16; the fp32 aggregate keeps the small component.
    deltas = {0: {"w": torch.ones(4, dtype=torch.bfloat16)}, 1: {"w": torch.full((4,), 2**-8, dtype=torch.bfloat16)}}
    out = weighted_sum(deltas, {0: 1.0, 1: 0.5})
    assert out["w"].dtype == torch.float32
    torch.testing.assert_close(out["w"], torch.full((4,), 1.0 + 2**-9))


@given(
    values=st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=8),
    raw_weights=st.lists(st.floats(0.01, 10), min_size=8, max_size=8),
)
def test_weighted_sum_of_constants_is_their_weighted_average(values, raw_weights):
    total = sum(raw_weights[: len(values)])
    weights = {c: raw_weights[c] / total for c in range(len(values))}
    deltas = {c: {"w": torch.full((3,), v)} for c, v in enumerate(values)}
    expected = sum(weights[c] * v for c, v in enumerate(values))
    out = weighted_sum(deltas, weights)["w"]
    torch.testing.assert_close(out, torch.full((3,), expected, dtype=torch.float32), atol=1e-4, rtol=1e-5)
    # A weighted mean lies between the smallest and largest input.
    assert min(values) - 1e-4 <= out[0].item() <= max(values) + 1e-4


def test_weighted_sum_errors():
    with pytest.raises(ValueError, match="no client deltas"):
        weighted_sum({}, {})
    with pytest.raises(ValueError, match=r"clients \[0, 1\] but weights for clients \[0\]"):
        weighted_sum({0: {"w": torch.zeros(1)}, 1: {"w": torch.zeros(1)}}, {0: 1.0})
    with pytest.raises(ValueError, match=r"Client 1 sent tensors \['v'\], expected \['w'\]"):
        weighted_sum({0: {"w": torch.zeros(1)}, 1: {"v": torch.zeros(1)}}, {0: 0.5, 1: 0.5})
    with pytest.raises(ValueError, match=r"Client 1 sent 'w' of shape \(1,\), expected \(3,\)"):
        weighted_sum({0: {"w": torch.zeros(3)}, 1: {"w": torch.zeros(1)}}, {0: 0.5, 1: 0.5})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_mean_aggregator_rejects_non_finite_deltas(bad):
    deltas = {0: {"w": torch.zeros(3)}, 1: {"w": torch.tensor([0.0, bad, 0.0])}}
    with pytest.raises(NonFiniteDeltaError, match="Client 1 sent a non-finite delta for 'w'"):
        MeanAggregator()(deltas, {0: 0.5, 1: 0.5})
    assert issubclass(NonFiniteDeltaError, FloatingPointError)
