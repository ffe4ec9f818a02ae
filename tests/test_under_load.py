"""Bounds that hold on a busy 2-core machine: one torch thread, and a slow-test limit that really stops."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

MAKEFILE = (Path(__file__).parents[1] / "Makefile").read_text()


def test_tests_run_with_the_thread_count_they_were_given():
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
    assert re.search(r"^export OMP_NUM_THREADS \?= 1$", MAKEFILE, re.MULTILINE)


def test_the_slow_test_bound_kills_a_process_that_survives_sigterm():
    """Lightning turns SIGTERM into an exception inside one test and pytest carries on: `timeout -k` ends it."""
    assert re.search(r"\ttimeout -k \$\(KILL_GRACE\) \$\(SLOW_TEST_LIMIT\) .*pytest -m \"slow and not distributed and not flower\"", MAKEFILE)
    assert re.search(r"\ttimeout -k \$\(KILL_GRACE\) \$\(DISTRIBUTED_TEST_LIMIT\) .*pytest -m distributed", MAKEFILE)
    assert re.search(r"\ttimeout -k \$\(KILL_GRACE\) \$\(FLOWER_TEST_LIMIT\) .*pytest -m flower", MAKEFILE)
    assert re.search(r"^test: test-fast test-slow test-distributed test-flower$", MAKEFILE, re.MULTILINE)
    survivor = "import signal, time; signal.signal(signal.SIGTERM, lambda *_: None); time.sleep(60)"
    started = time.monotonic()
    result = subprocess.run(["timeout", "-k", "1", "1", sys.executable, "-c", survivor])  # the same, in seconds
    assert result.returncode in (137, -9) and time.monotonic() - started < 15  # killed, not 60 s later
