"""The same aggregator between two real ranks: every delta gathered gives the in-memory bits; partial sums agree
to fp32 rounding (the ranks add their own clients first, so the order of the additions differs). A non-finite
delta on one rank is left out on both, or makes both raise naming it, whichever rule."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from aggregation_ranks import BAD_CLIENT, REUSED_ROUNDS, RULES, SKIPPING, WEIGHTS, round_deltas

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
SCRIPT = Path(__file__).parent / "aggregation_ranks.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_ranks_aggregate_as_one_process_does(tmp_path):
    out = tmp_path / "aggregates.pt"
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
    ranks = [torch.load(f"{out}.rank{rank}", weights_only=True) for rank in (0, 1)]
    for round_index, rules, with_nan in ((0, RULES, False), (1, SKIPPING, True)):
        deltas = round_deltas(with_nan)
        for name, aggregator in rules.items():
            in_one_process = aggregator(deltas, WEIGHTS)
            for over_ranks in ranks:
                aggregate, skipped = over_ranks[round_index, name]
                assert skipped == in_one_process.skipped_clients == ([BAD_CLIENT] if with_nan else [])
                for tensor in in_one_process.aggregate:
                    expected = in_one_process.aggregate[tensor]
                    if aggregator.reduces_from_partial_sums:
                        torch.testing.assert_close(aggregate[tensor], expected, rtol=1e-6, atol=1e-6)
                    else:
                        assert torch.equal(aggregate[tensor], expected), (name, tensor)
    for over_ranks in ranks:  # released aggregates: every later round's sum is made in the same memory, and right
        for round_index in range(REUSED_ROUNDS):
            aggregate, _ = over_ranks["reused", round_index]
            expected = RULES["mean"](round_deltas(seed=20 + round_index), WEIGHTS).aggregate
            for tensor in expected:
                torch.testing.assert_close(aggregate[tensor], expected[tensor], rtol=1e-6, atol=1e-6)
        assert len({over_ranks["reused", r][1] for r in range(REUSED_ROUNDS)}) == 1
    for name in RULES:  # the "raise" policy: both ranks stop, naming the client, its rank and, on its own, the tensor
        for rank, tensor in ((0, ""), (1, " for 'c'")):
            assert ranks[rank][2, name] == (
                f"NonFiniteDeltaError: Client {BAD_CLIENT} (rank 1) sent a non-finite delta{tensor}"
                " (Aggregator(nonfinite='skip') leaves such clients out instead)."
            ), (name, rank)
