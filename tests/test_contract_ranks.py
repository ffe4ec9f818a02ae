"""The same aggregator between two real ranks: every delta gathered gives the in-memory bits; partial sums agree
to fp32 rounding (the ranks add their own clients first, so the order of the additions differs)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from aggregation_ranks import RULES, WEIGHTS, round_deltas

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
    over_ranks = torch.load(out, weights_only=True)
    deltas = round_deltas()
    for name, aggregator in RULES.items():
        in_one_process = aggregator(deltas, WEIGHTS).aggregate
        for tensor in in_one_process:
            if aggregator.reduces_from_partial_sums:
                torch.testing.assert_close(over_ranks[name][tensor], in_one_process[tensor], rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(over_ranks[name][tensor], in_one_process[tensor]), (name, tensor)
