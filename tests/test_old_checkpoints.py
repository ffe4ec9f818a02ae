"""Checkpoints written before the package moved into layers still resume, to the model their run recorded.

The fixtures were written by the code of d7afa26 (``tests/fixtures/main_checkpoints/make.py``): the checkpoint
after round 2 of a 4-round run, and the final model of that run uninterrupted. What is exact, and checked bit for
bit, is within one environment: a run resumed from its own round-2 checkpoint ends on the model of the same run
straight through. Across environments (torch, its kernels, the CPU) float32 sums round differently, so the old
checkpoint's resume is checked against the recorded model within :data:`TOLERANCE`, which a resume that lost a piece
of the federation's state misses by far.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_run import train

FIXTURES = Path(__file__).parent / "fixtures" / "main_checkpoints"
SETTINGS = dict(rounds=4, optimizer="adamw", clients_per_round=3, compression="topk")
TOLERANCE = 1e-6
"""Largest absolute difference allowed per parameter (its values are up to about 0.5) between a resume here and
the model recorded where the fixture was written: another environment moved it by 3e-8; a resume without the
pending deltas moves it by about 0.1."""


def assert_same_model(resumed: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name


def largest_difference(resumed: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert resumed.keys() == expected.keys()
    return max((resumed[name] - value).abs().max().item() for name, value in expected.items())


def test_the_fixture_holds_what_a_resume_needs():
    saved = torch.load(FIXTURES / "round2_1proc.ckpt", weights_only=False)
    federation = saved["federation"]
    assert federation["pending"] and federation["residuals"], "staleness 1 and top-k: pending deltas and residuals"


@pytest.mark.slow
def test_a_resume_equals_the_straight_run_here_and_the_old_checkpoint_reaches_the_recorded_model(tmp_path):
    straight = train(tmp_path / "straight.pt", devices=1, checkpoint_dir=tmp_path / "checkpoints", **SETTINGS)["params"]
    (round_2,) = (tmp_path / "checkpoints").glob("epoch=1-*.ckpt")
    assert_same_model(train(tmp_path / "resumed.pt", devices=1, ckpt_path=round_2, **SETTINGS)["params"], straight)

    old = train(tmp_path / "old.pt", devices=1, ckpt_path=FIXTURES / "round2_1proc.ckpt", **SETTINGS)["params"]
    assert largest_difference(old, torch.load(FIXTURES / "final_1proc.pt")) <= TOLERANCE
    assert largest_difference(old, straight) <= TOLERANCE


@pytest.mark.slow
def test_the_tolerance_tells_a_resume_that_lost_state(tmp_path):
    checkpoint = torch.load(FIXTURES / "round2_1proc.ckpt", weights_only=False)
    pending = _tensors(checkpoint["federation"]["pending"])
    assert any(tensor.any() for tensor in pending)
    for tensor in pending:  # the pending deltas lost, as a resume that did not restore them would
        tensor.zero_()
    torch.save(checkpoint, tmp_path / "lost.ckpt")
    resumed = train(tmp_path / "lost.pt", devices=1, ckpt_path=tmp_path / "lost.ckpt", **SETTINGS)["params"]
    assert largest_difference(resumed, torch.load(FIXTURES / "final_1proc.pt")) > 1000 * TOLERANCE


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [tensor for item in items for tensor in _tensors(item)]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_two_process_checkpoint_of_the_old_layout_resumes_to_the_recorded_model(tmp_path):
    from test_distributed import launch

    arguments = [f"--{k}={v}" for k, v in SETTINGS.items()]
    code, output, _ = launch(tmp_path / "out.pt", *arguments, "--ckpt_path", str(FIXTURES / "round2_2proc.ckpt"))
    assert code == 0, output[-3000:]
    resumed = torch.load(tmp_path / "out.pt", weights_only=False)["params"]
    assert largest_difference(resumed, torch.load(FIXTURES / "final_2proc.pt")) <= TOLERANCE
