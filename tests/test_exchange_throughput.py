"""benchmarks/exchange_throughput.py --quick: the exchange's host path, in memory and over two processes, beside
this machine's own memory bandwidth."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "exchange_throughput.py"
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_quick_runs_both_paths_and_wires_and_reports_every_stage_beside_memcpy(tmp_path):
    summary = tmp_path / "summary.json"
    command = [sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--clients", "1,2", "--json", str(summary)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"one thread, .*: memcpy [0-9.]+ GB/s, sum [0-9.]+ GB/s, read \(aminmax\) [0-9.]+ GB/s", out), out
    table = out.split("\n\n")[-1]
    number = r" +[0-9.]+"
    for path, all_reduce in (("in memory", " +-"), ("2 proc shm", number), ("2 proc gloo", number)):
        for wire in ("fp32", "bf16"):
            for clients in (1, 2):
                stages = rf"{number}{number}{number}{all_reduce}"  # new sum, write, sum, all-reduce
                row = rf"^ *{path} {wire} +{clients} \|{stages} \|{number}{number}{number} +[0-9]+%{number}$"
                assert re.search(row, table, re.MULTILINE), (path, wire, clients, table)
    assert summary.stat().st_size > 0
