"""A round's sum is made in the memory of an aggregate the boundary has applied, never in one still in use."""

from __future__ import annotations

import threading
from typing import Optional

import pytest
import torch
from helpers import lightning_and_reference, max_abs_diff

from lightning_parablock.aggregation import Aggregator, MeanAggregator, MedianAggregator
from lightning_parablock.aggregation.rules import SLICE_VALUES
from lightning_parablock.comm.codecs import BF16Codec, Codec, Int8Codec, decode_delta
from lightning_parablock.comm.in_memory import InMemoryTransport
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.comm.sum_buffers import SumBuffers
from lightning_parablock.comm.transport import RoundUploads


def test_a_released_sum_is_made_again_in_its_memory():
    sums = SumBuffers()
    first, release = sums.take(10)
    first.fill_(3.0)
    release()
    again, release_again = sums.take(10)
    assert again.data_ptr() == first.data_ptr() and again.dtype == torch.float32
    release_again()
    smaller, _ = sums.take(4)  # a smaller block fits in the front of it
    assert smaller.data_ptr() == first.data_ptr() and smaller.shape == (4,)


def test_a_sum_larger_than_the_free_memory_gets_its_own():
    sums = SumBuffers()
    small, release = sums.take(4)
    release()
    large, _ = sums.take(12)
    assert large.data_ptr() != small.data_ptr() and large.shape == (12,)


def test_a_sum_never_released_is_never_written_again():
    sums = SumBuffers()
    kept, _ = sums.take(6)
    kept.fill_(5.0)
    later, _ = sums.take(6)
    assert later.data_ptr() != kept.data_ptr() and torch.equal(kept, torch.full((6,), 5.0))


def test_releasing_twice_hands_the_memory_back_once():
    sums = SumBuffers()
    first, release = sums.take(8)
    release()
    in_use, _ = sums.take(8)  # the next round's sum, in the same memory
    release()  # a stale second call must not offer it again
    other, _ = sums.take(8)
    assert in_use.data_ptr() == first.data_ptr() and other.data_ptr() != in_use.data_ptr()


@pytest.mark.parametrize("rule", [MeanAggregator(), MeanAggregator(clip_norm=0.5)], ids=["mean", "clipped"])
@pytest.mark.parametrize("clients", [0, 1, 3])
@pytest.mark.parametrize("left_over", [float("nan"), float("inf"), 7.0], ids=["nan", "inf", "number"])
def test_a_sum_into_used_memory_equals_a_sum_into_zeros(rule, clients, left_over):
    """Whatever an earlier round left in the memory (a sum holding NaN, left out under "skip", included) is replaced:
    the same values as a new sum, each client still checked. Slices of 2^20 values and small tensors alike."""
    generator = torch.Generator().manual_seed(clients)
    shapes = {"big": (SLICE_VALUES + 5,), "small": (3, 4)}
    deltas = {c: {n: torch.randn(shape, generator=generator) for n, shape in shapes.items()} for c in range(clients)}
    weights = {c: 1.0 / max(clients, 1) for c in range(clients)}
    fresh = {name: torch.zeros(shape) for name, shape in shapes.items()}
    used = {name: torch.full(shape, left_over) for name, shape in shapes.items()}
    assert rule.accumulate(fresh, deltas, weights) == rule.sum_into(used, deltas, weights) == {}
    assert all(torch.equal(used[name], fresh[name]) for name in shapes)


def test_a_rule_of_ones_own_that_sums_gets_used_memory_zeroed_first():
    class Sum(Aggregator):
        reduces_from_partial_sums = True

        def combine(self, deltas, weights):
            return {n: sum(d[n] for d in deltas.values()) for n in next(iter(deltas.values()))}

        def accumulate(self, total, deltas, weights):
            for delta in deltas.values():
                for name, tensor in delta.items():
                    total[name].add_(tensor)
            return {}

    used = {"w": torch.full((4,), float("nan"))}
    Sum().sum_into(used, {0: {"w": torch.ones(4)}, 1: {"w": torch.ones(4)}}, {0: 0.5, 1: 0.5})
    assert torch.equal(used["w"], torch.full((4,), 2.0))


def _uploads(round_index: int, codec: Optional[Codec] = None, clients: int = 3) -> RoundUploads:
    codec = codec or Codec()
    generator = torch.Generator().manual_seed(round_index)
    deltas = {
        client: {"a": torch.randn(5, 3, generator=generator), "b": torch.randn(7, generator=generator)}
        for client in range(clients)
    }
    encoded = {client: {name: codec.encode(t) for name, t in delta.items()} for client, delta in deltas.items()}
    return RoundUploads(round_index, 0, encoded, {client: float(client + 1) for client in deltas})


def _decoded(uploads: RoundUploads, rule: Optional[Aggregator] = None) -> dict[str, torch.Tensor]:
    """What ``rule`` (the mean) makes of every upload decoded to fp32 first."""
    decoded = {client: decode_delta(delta) for client, delta in uploads.deltas.items()}
    return (rule or MeanAggregator())(decoded, uploads.weights).aggregate


def test_the_in_memory_mean_reuses_a_released_aggregates_memory_and_keeps_one_in_use():
    transport = InMemoryTransport(MeanAggregator(), SimulatedLink())
    first = transport.exchange(_uploads(0), threading.Event())
    kept = {name: t.clone() for name, t in first.aggregate.items()}
    second = transport.exchange(_uploads(1), threading.Event())  # round 0 not released: new memory
    assert second.aggregate["a"].data_ptr() != first.aggregate["a"].data_ptr()
    assert all(torch.equal(first.aggregate[n], kept[n]) for n in kept)
    second.release_aggregate()
    third = transport.exchange(_uploads(2), threading.Event())
    assert third.aggregate["a"].data_ptr() == second.aggregate["a"].data_ptr()
    expected = _decoded(_uploads(2))
    assert all(torch.equal(third.aggregate[n], expected[n]) for n in expected)


@pytest.mark.parametrize("codec", [Codec(), BF16Codec(), Int8Codec()], ids=["fp32", "bf16", "int8"])
def test_the_mean_reads_a_cast_on_the_wire_as_sent_and_decodes_the_rest(codec, monkeypatch):
    uploads = _uploads(0, codec)
    expected = _decoded(uploads)
    decodes = []
    owner = next(kind for kind in type(codec).__mro__ if "decode" in vars(kind))  # the class whose decode runs
    original = owner.decode
    monkeypatch.setattr(owner, "decode", lambda self, encoded: decodes.append(1) or original(self, encoded))
    result = InMemoryTransport(MeanAggregator(), SimulatedLink()).exchange(uploads, threading.Event())
    assert all(torch.equal(result.aggregate[n], expected[n]) for n in expected)  # the same bits as decoded first
    assert all(t.dtype == torch.float32 for t in result.aggregate.values())
    assert bool(decodes) == isinstance(codec, Int8Codec)


def test_a_rule_that_needs_every_delta_gets_them_decoded_in_new_memory():
    uploads = _uploads(0, BF16Codec())
    transport = InMemoryTransport(MedianAggregator(), SimulatedLink())
    result = transport.exchange(uploads, threading.Event())
    expected = _decoded(uploads, MedianAggregator())
    assert all(torch.equal(result.aggregate[n], expected[n]) for n in expected)


def test_in_a_fit_each_round_is_summed_in_the_memory_the_last_boundary_released(monkeypatch):
    """The boundary releases what it applied: a later round's sum is made in that memory (not merely memory the
    allocator happened to give back), and the fit still equals the literal reference."""
    reused: list[bool] = []
    take = SumBuffers.take

    def recording(self, numel, pin_memory=False):
        free = self._free
        vector, release = take(self, numel, pin_memory)
        reused.append(free is not None and vector.data_ptr() == free.data_ptr())
        return vector, release

    monkeypatch.setattr(SumBuffers, "take", recording)
    module, reference, strategy, _ = lightning_and_reference(staleness=1, num_clients=3, rounds=5)
    assert max_abs_diff(module, reference.global_model) <= 1e-6
    sizes = [strategy.partition.numel(module, strategy.plan.block_of(t)) for t in range(5)]
    # the first exchange has nothing released before it; each later one reuses when its block fits the largest so far
    assert reused == [False] + [sizes[t] <= max(sizes[:t]) for t in range(1, 5)]
    assert any(reused)


# ------------------------------------------------------------------ rules of one's own


class DoubledMean(MeanAggregator):
    """A subclass with a sum of its own: twice the mean."""

    def accumulate(self, total, deltas, weights):
        seen = []
        for client in sorted(deltas):
            for name, tensor in deltas[client].items():
                seen.append(tensor.dtype)
                total[name].add_(tensor, alpha=2 * weights[client])
        self.dtypes = seen
        return {}


def test_a_mean_with_a_sum_of_its_own_gets_it_used_over_reused_memory_and_decoded_deltas():
    assert MeanAggregator.reads_payloads_as_sent and not DoubledMean.reads_payloads_as_sent
    rule = DoubledMean()
    used = {"w": torch.full((3,), float("nan"))}
    rule.sum_into(used, {0: {"w": torch.ones(3)}, 1: {"w": torch.ones(3)}}, {0: 0.5, 1: 0.5})
    assert torch.equal(used["w"], torch.full((3,), 2.0))
    transport = InMemoryTransport(rule, SimulatedLink())
    result = transport.exchange(_uploads(0, BF16Codec()), threading.Event())
    assert set(rule.dtypes) == {torch.float32}  # decoded, as a rule of its own always got them
    expected = _decoded(_uploads(0, BF16Codec()))
    assert all(torch.allclose(result.aggregate[n], 2 * expected[n]) for n in expected)


def test_a_rule_that_overrides_checked_combine_the_old_way_is_called_without_memory():
    class Logged(MeanAggregator):
        def checked_combine(self, deltas, weights):  # the signature before `into`
            return super().checked_combine(deltas, weights)

    assert not Logged().sums_in_given_memory and MeanAggregator().sums_in_given_memory
    result = InMemoryTransport(Logged(), SimulatedLink()).exchange(_uploads(0), threading.Event())
    expected = _decoded(_uploads(0))
    assert all(torch.equal(result.aggregate[n], expected[n]) for n in expected)


def test_a_rule_that_says_it_sums_but_only_combines_still_combines_when_called():
    class Combining(Aggregator):
        reduces_from_partial_sums = True

        def combine(self, deltas, weights):
            return {"w": sum(weights[c] * d["w"] for c, d in deltas.items())}

    assert not Combining().sums_in_given_memory
    result = Combining()({0: {"w": torch.ones(2)}, 1: {"w": torch.full((2,), 3.0)}}, {0: 1.0, 1: 1.0})
    assert torch.equal(result.aggregate["w"], torch.full((2,), 2.0))


def test_writing_over_used_memory_keeps_a_wider_deltas_product_and_clears_what_no_client_sent():
    from lightning_parablock.aggregation.rules import add_weighted

    delta = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    added, written = {"w": torch.zeros(1000), "x": torch.zeros(1)}, {"w": torch.full((1000,), 9.0), "x": torch.ones(1)}
    add_weighted(added, {0: {"w": delta}}, {0: 1 / 3})
    add_weighted(written, {0: {"w": delta}}, {0: 1 / 3}, overwrite=True)
    assert torch.equal(written["w"], added["w"]) and torch.equal(written["x"], torch.zeros(1))
    assert not torch.equal(delta.float() * (1 / 3), added["w"])  # rounding the delta to fp32 first would differ


def test_an_applied_aggregate_is_not_handed_back_and_closing_lets_its_memory_go():
    from lightning_parablock.comm.by_processes import ByProcesses
    from lightning_parablock.core.planning import RoundPlan
    from lightning_parablock.core.schedule import BlockSchedule
    from lightning_parablock.strategies.client_exchange import ClientExchange
    from lightning_parablock.strategies.exchange_spec import ExchangeSpec

    plan = RoundPlan(1, 1, 0, BlockSchedule("sequential", 1, 0), [0], world_size=1, rank=0)
    exchange = ClientExchange(None, plan, ExchangeSpec(transport=ByProcesses()), 1.0, torch.device("cpu"))
    exchange.open(member=0, members=1)
    exchange.apply_aggregate = lambda round_index, aggregate, left_out=(): None  # no federation here
    exchange._thread().submit(RoundUploads(0, 0, {0: {"w": torch.ones(3)}}, {0: 1.0}))
    outcome = exchange.finish(0)
    assert outcome is not None and outcome.result.aggregate is None
    exchange.close()
    assert exchange._worker is None  # the transport, and the sum's memory it kept, go with it
