"""The same aggregator between two real ranks: every delta gathered gives the in-memory bits; partial sums agree
to fp32 rounding (the ranks add their own clients first, so the order of the additions differs), and are the same
bits whether gloo or shared memory adds them up. A non-finite delta on one rank is left out on both, or makes both
raise naming it, whichever rule."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from aggregation_ranks import BAD_CLIENT, REUSED_ROUNDS, RULES, SKIPPING, SUMS, WEIGHTS, round_deltas

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
SCRIPT = Path(__file__).parent / "aggregation_ranks.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def aggregates(tmp_path_factory) -> list[dict]:
    """What each of the two ranks of ``aggregation_ranks.py`` saved."""
    out = tmp_path_factory.mktemp("ranks") / "aggregates.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), str(free_port())], env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        output = b"(timed out)"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert process.returncode == 0, output.decode()[-3000:]
    return [torch.load(f"{out}.rank{rank}", weights_only=True) for rank in (0, 1)]


def test_two_ranks_aggregate_as_one_process_does(aggregates):
    ranks = aggregates
    for sums in SUMS:
        for round_index, rules, with_nan in ((0, RULES, False), (1, SKIPPING, True)):
            deltas = round_deltas(with_nan)
            for name, aggregator in rules.items():
                in_one_process = aggregator(deltas, WEIGHTS)
                for over_ranks in ranks:
                    aggregate, skipped = over_ranks[sums, round_index, name]
                    assert skipped == in_one_process.skipped_clients == ([BAD_CLIENT] if with_nan else [])
                    for tensor in in_one_process.aggregate:
                        expected = in_one_process.aggregate[tensor]
                        if aggregator.reduces_from_partial_sums:
                            torch.testing.assert_close(aggregate[tensor], expected, rtol=1e-6, atol=1e-6)
                        else:
                            assert torch.equal(aggregate[tensor], expected), (name, tensor)
        for over_ranks in ranks:  # released aggregates: every later round's sum is made in the same memory, and right
            for round_index in range(REUSED_ROUNDS):
                aggregate, _ = over_ranks[sums, "reused", round_index]
                assert_close_to_one_process(aggregate, round_deltas(seed=20 + round_index))
            assert len({over_ranks[sums, "reused", r][1] for r in range(REUSED_ROUNDS)}) == 1
            assert over_ranks[sums, "reused", "shared memory kept"] == (sums == "shared")
        for name in RULES:  # "raise": both ranks stop, naming the client, its rank and, on its own, the tensor
            for rank, tensor in ((0, ""), (1, " for 'c'")):
                assert ranks[rank][sums, 2, name] == (
                    f"NonFiniteDeltaError: Client {BAD_CLIENT} (rank 1) sent a non-finite delta{tensor}"
                    " (Aggregator(nonfinite='skip') leaves such clients out instead)."
                ), (name, rank)


def test_two_ranks_shared_memory_sums_are_gloos_bits_on_both_ranks(aggregates):  # a + b == b + a
    ranks = aggregates
    for key in ranks[0]:
        if key[0] == "shared" and isinstance(ranks[0][key], tuple) and isinstance(ranks[0][key][0], dict):
            gloo = ranks[0][("gloo", *key[1:])][0]
            for over_ranks in ranks:
                for tensor, value in over_ranks[key][0].items():
                    assert torch.equal(value, gloo[tensor]), (key, tensor)


def test_shared_memory_keeps_aggregates_held_at_once_apart_and_reuses_them(aggregates):
    for over_ranks in aggregates:
        (first, first_at), (second, second_at) = over_ranks["held"]
        assert first_at != second_at  # a held aggregate is never written over
        assert_close_to_one_process(first, round_deltas(seed=30))
        assert_close_to_one_process(second, round_deltas(seed=31))
        again, again_at = over_ranks["held", "again"]
        assert again_at in (first_at, second_at)  # both handed back: one of them is used again
        assert_close_to_one_process(again, round_deltas(seed=32))


def test_a_full_dev_shm_on_one_rank_falls_back_to_gloo_on_both(aggregates):
    for over_ranks in aggregates:
        for round_index in range(2):
            aggregate, on_gloo = over_ranks["full", round_index]
            assert on_gloo
            assert_close_to_one_process(aggregate, round_deltas(seed=40 + round_index))
    whys = ("another rank could not get its memory", "this rank's: [Errno 28] No space left on device")
    for rank, why in enumerate(whys):
        (warned,) = aggregates[rank]["full", "warned"]  # once, not every round
        assert warned.startswith(f"Rank {rank} adds up the exchange's sums by gloo from now on: shared memory in /dev")
        assert f"failed ({why})" in warned and "--shm-size" in warned


def test_shared_memory_leaves_no_file_behind(aggregates):
    for over_ranks in aggregates:
        assert over_ranks["tokens"] == len(RULES) * 3 + 3  # every shared transport made here
        assert over_ranks["left in /dev/shm"] == []


def assert_close_to_one_process(aggregate, deltas) -> None:
    expected = RULES["mean"](deltas, WEIGHTS).aggregate
    for tensor in expected:
        torch.testing.assert_close(aggregate[tensor], expected[tensor], rtol=1e-6, atol=1e-6)
