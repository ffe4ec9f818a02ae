"""Several processes (gloo on CPU), launched the way users launch them: the script with ``devices=2``.

Lightning's launcher re-runs ``distributed_run.py`` for rank 1; every launch runs in its own session
with a hard timeout, and the whole process group is killed afterwards, so a hang fails the test
instead of CI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_run import train
from helpers import slurm_variables

TESTS = Path(__file__).parent
SCRIPT = TESTS / "distributed_run.py"
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def launch(out: Path, *args: str, timeout: float = 240) -> tuple[int, str, float]:
    """Run the 2-process federation; return its exit code, its output and how long it took."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--devices", "2", *args]
    process = subprocess.Popen(
        command, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    start = time.monotonic()
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the 2-process run hung past {timeout}s:\n{output.decode()[-3000:]}")
    finally:
        _kill_group(process.pid)
    return process.returncode, output.decode(), time.monotonic() - start


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def assert_close_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    worst = max((a[name] - b[name]).abs().max().item() for name in a)
    assert worst <= atol, f"largest parameter difference {worst:.3g} > {atol}"


@pytest.mark.parametrize(
    "settings",
    [
        dict(staleness=0),
        dict(staleness=1),
        dict(staleness=2),
        dict(staleness=1, clients_per_round=3, weighting="samples"),
        dict(staleness=1, optimizer="adamw"),
        dict(staleness=1, aggregator="median"),
        dict(staleness=1, compression="topk"),
        dict(staleness=1, compression="int8"),
        dict(staleness=1, clients_per_round=3, optimizer="adamw", lr_schedule="cosine"),  # with idle turns
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_two_processes_of_two_clients_equal_one_process_of_four(tmp_path, settings):
    out = tmp_path / "two.pt"
    args = [f"--{key}={value}" for key, value in settings.items()]
    code, output, _ = launch(out, *args)
    assert code == 0, output[-3000:]
    two = torch.load(out, weights_only=False)
    one = train(tmp_path / "one.pt", devices=1, **settings)
    # Each rank sums its own clients' weighted deltas before the all-reduce adds the ranks' partial
    # sums, so the float additions run in another order than one process's client-by-client sum:
    # fp32 rounding (a few ulp, ~1e-8 here), which AdamW's normalization does not amplify over 4 rounds.
    assert_close_params(two["params"], one["params"], atol=1e-6)
    rounds = [r for r in two["records"] if not r["flush"]]
    assert all(sorted(r["compute_seconds"]) == sorted(r["participants"]) for r in rounds)
    assert all(set(r["ranks"]) == {0, 1} and set(r["client_rank"].values()) <= {0, 1} for r in rounds)
    # every client's loss at each of its 2 local steps, from whichever rank trained it
    assert all(sorted(r["client_step_loss"]) == sorted(r["participants"]) for r in rounds)
    assert all(len(steps) == 2 for r in rounds for steps in r["client_step_loss"].values())
    # every client's upload is counted as it was encoded, whichever rank hosts it
    assert [r["upload_bytes"] for r in two["records"]] == [r["upload_bytes"] for r in one["records"]]


@pytest.mark.parametrize("name", ["flora", "fedcybgd"])
def test_table1_methods_on_two_processes_of_two_clients_equal_one_process_of_four(tmp_path, name):
    """FLoRA's stacks go through the collective's all-gather; FedCyBGD trains one client per round, the other rank idle."""
    out = tmp_path / "two.pt"
    code, output, _ = launch(out, f"--method={name}", "--rounds=2")
    assert code == 0, output[-3000:]
    two = torch.load(out, weights_only=False)
    one = train(tmp_path / "one.pt", devices=1, method=name, rounds=2)
    # SGD; the all-gathered stack is the same tensors in the same client order, so the only difference is the
    # order of float additions in the merge (fp32 rounding, ~1e-8 here)
    assert_close_params(two["params"], one["params"], atol=1e-6)
    assert [r["participants"] for r in two["records"]] == [r["participants"] for r in one["records"]]
    assert [r["upload_bytes"] for r in two["records"]] == [r["upload_bytes"] for r in one["records"]]
    assert [r["download_bytes"] for r in two["records"]] == [r["download_bytes"] for r in one["records"]]
    if name == "fedcybgd":
        assert [r["participants"] for r in two["records"] if not r["flush"]] == [[t % 4] for t in range(8)]


def test_both_processes_killed_mid_run_resume_bit_identically(tmp_path):
    uninterrupted = tmp_path / "uninterrupted.pt"
    code, output, _ = launch(uninterrupted)
    assert code == 0, output[-3000:]

    checkpoints, marker, resumed = tmp_path / "checkpoints", tmp_path / "stalled.json", tmp_path / "resumed.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable, str(SCRIPT), "--out", str(resumed), "--devices", "2", "--checkpoint_dir", str(checkpoints),
        "--fault", "killed", "--fault_round", "2", "--marker", str(marker),
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert process.poll() is None, f"the run exited early with {process.returncode}"
            assert time.monotonic() < deadline, "the run never reached round 2"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # both ranks, mid-round
        process.wait()
    assert json.loads(marker.read_text())["pid"]
    assert (checkpoints / "last.ckpt").exists()

    code, output, _ = launch(resumed, "--checkpoint_dir", str(checkpoints), "--resume")
    assert code == 0, output[-3000:]
    a, b = torch.load(uninterrupted, weights_only=False), torch.load(resumed, weights_only=False)
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name


def test_a_rank_that_raises_stops_the_other_with_the_cause(tmp_path):
    code, output, seconds = launch(tmp_path / "out.pt", "--fault", "raise", "--fault_rank", "1", timeout=180)
    assert code != 0
    assert "rank 1 failed in round 2: RuntimeError: simulated failure on rank 1" in output, output[-3000:]
    assert not (tmp_path / "out.pt").exists()


def test_a_stalled_exchange_ends_within_comm_timeout_naming_the_rank(tmp_path):
    code, output, seconds = launch(
        tmp_path / "out.pt", "--fault", "stall", "--fault_rank", "1", "--comm_timeout", "5", timeout=180
    )
    assert code != 0
    assert "did not finish within comm_timeout=5.0s" in output, output[-3000:]
    assert "Rank(s) [1] never joined it" in output, output[-3000:]


@pytest.mark.parametrize("signalled_rank", [0, 1])
def test_a_sigterm_stops_both_ranks_at_the_same_turn_start_without_a_fault_report(tmp_path, signalled_rank):
    # Rank 0 signalled: as SLURM preempts a job, and rank 0 forwards the signal to the rank it launched.
    # Rank 1 signalled: only that rank knows; the others learn it at the next turn start. No collective
    # runs inside the signal handler (Lightning's own broadcast there could meet another rank's
    # round-end all-gather); the ranks agree at the next turn start and all stop there, gracefully.
    fault = ["--fault", "sigterm", "--fault_rank", str(signalled_rank)]
    code, output, _ = launch(tmp_path / "out.pt", *fault, timeout=180)
    assert code == 0, output[-3000:]  # Lightning's SIGTERMException is a SystemExit without an error code
    assert f"[rank: {signalled_rank}] Received SIGTERM" in output, output[-3000:]
    stops = dict(re.findall(r"\[rank (\d)\] stopped by SIGTERMException (in round \d+ after \d+ batches)", output))
    assert set(stops) == {"0", "1"} and stops["0"] == stops["1"], output[-3000:]
    assert "failed in round" not in output and "Traceback" not in output, output[-3000:]
    assert not (tmp_path / "out.pt").exists()  # training stopped before its end


def test_slurms_requeue_signal_to_one_rank_saves_every_ranks_clients_at_the_rounds_end_and_resumes(tmp_path):
    # As srun starts a job: each process with its SLURM_* variables, auto-requeue on. Only rank 1 gets
    # the signal mid-round; at the round's end both ranks save together (the checkpoint gathers every
    # rank's clients), rank 0 requeues, and training goes on. The requeued job resumes bit-identically.
    uninterrupted = tmp_path / "uninterrupted.pt"
    code, output, _ = launch(uninterrupted)
    assert code == 0, output[-3000:]

    signalled = tmp_path / "signalled"
    signalled.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
            **slurm_variables(rank, tasks=2),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        command = [
            sys.executable, str(SCRIPT), "--out", str(signalled / "out.pt"), "--devices", "2", "--slurm",
            "--fault", "requeue", "--fault_rank", "1", "--fault_round", "2",
        ]  # fmt: skip
        processes.append(
            subprocess.Popen(command, cwd=signalled, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)  # fmt: skip
        )
    outputs = []
    try:
        for process in processes:
            try:
                outputs.append(process.communicate(timeout=180)[0].decode())
            except subprocess.TimeoutExpired:
                pytest.fail("the SLURM-style 2-process run hung past 180 s")
            assert process.returncode == 0, outputs[-1][-3000:]
    finally:
        for process in processes:
            _kill_group(process.pid)
    rank0, rank1 = outputs
    assert "[rank: 1] Received requeue signal" in rank1, rank1[-3000:]
    assert rank0.count("requeue: ['scontrol', 'requeue', '4242']") == 1, rank0[-3000:]
    checkpoint = torch.load(signalled / "hpc_ckpt_1.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 2  # saved at the end of round 2, the round the signal arrived in
    assert sorted(checkpoint["federation"]["pending"]) == [0, 1, 2, 3]  # both ranks' clients

    resumed = tmp_path / "resumed.pt"
    code, output, _ = launch(resumed, "--ckpt_path", str(signalled / "hpc_ckpt_1.ckpt"))
    assert code == 0, output[-3000:]
    a, b = torch.load(uninterrupted, weights_only=False), torch.load(resumed, weights_only=False)
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name


@pytest.mark.parametrize("killed_rank", [1, pytest.param(0, id="the-store-host")])
def test_a_rank_killed_without_a_word_is_named_with_the_round_in_the_last_line(tmp_path, killed_rank):
    # No traceback of the collective that noticed it: the survivor names the lost rank and the round, and stops.
    # (Lightning's launcher may add its own line about the killed child after it, naming the rank too.)
    code, output, seconds = launch(tmp_path / "out.pt", "--fault", "sigkill", "--fault_rank", str(killed_rank), timeout=180)
    assert code != 0
    lines = output.strip().splitlines()
    ours = [i for i, line in enumerate(lines) if f"stopping because rank {killed_rank} was lost in round 2" in line]
    assert ours, output[-3000:]
    after = lines[ours[-1] + 1 :]
    assert all("Child process with PID" in line and "terminated with code -9" in line for line in after), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not (tmp_path / "out.pt").exists()


def test_a_refusal_at_setup_on_two_processes_is_one_line_and_the_run_folders_go_once(tmp_path):
    # Both ranks reach the refusal with the same new run folders; only the first process of the machine removes them.
    from helpers import tiny_recipe_args

    before = sorted(p.name for p in tmp_path.iterdir())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    args = tiny_recipe_args(tmp_path, "--trainer.devices", "2", "--trainer.callbacks.init_args.staleness", "5")
    process = subprocess.Popen(
        [sys.executable, "-m", "lightning_parablock.cli.command", "fit", *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        output = process.communicate(timeout=240)[0].decode()
    except subprocess.TimeoutExpired:
        pytest.fail("the refused 2-process run hung past 240s")
    finally:
        _kill_group(process.pid)
    assert process.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "FileNotFoundError" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("parablock: error:")]
    assert errors and all("`staleness=5` is not below the number of rounds (max_epochs=2)" in e for e in errors), output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder left behind
