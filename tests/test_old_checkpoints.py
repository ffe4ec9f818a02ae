"""Checkpoints written before the package moved into layers still resume, bit-identically.

The fixtures were written by the code of d7afa26 (``tests/fixtures/main_checkpoints/make.py``): the checkpoint
after round 2 of a 4-round run, and the final model of that run uninterrupted. Resuming the checkpoint with
today's code must end on exactly that model, on 1 process and on 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_run import train

FIXTURES = Path(__file__).parent / "fixtures" / "main_checkpoints"
SETTINGS = dict(rounds=4, optimizer="adamw", clients_per_round=3, compression="topk")


def assert_same_model(resumed: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name


def test_the_fixture_holds_what_a_resume_needs():
    saved = torch.load(FIXTURES / "round2_1proc.ckpt", weights_only=False)
    federation = saved["federation"]
    assert federation["pending"] and federation["residuals"], "staleness 1 and top-k: pending deltas and residuals"


@pytest.mark.slow
def test_a_one_process_checkpoint_of_the_old_layout_resumes_bit_identically(tmp_path):
    resumed = train(tmp_path / "out.pt", devices=1, ckpt_path=FIXTURES / "round2_1proc.ckpt", **SETTINGS)
    assert_same_model(resumed["params"], torch.load(FIXTURES / "final_1proc.pt"))


@pytest.mark.slow
@pytest.mark.distributed
def test_a_two_process_checkpoint_of_the_old_layout_resumes_bit_identically(tmp_path):
    from test_distributed import launch

    arguments = [f"--{k}={v}" for k, v in SETTINGS.items()]
    code, output, _ = launch(tmp_path / "out.pt", *arguments, "--ckpt_path", str(FIXTURES / "round2_2proc.ckpt"))
    assert code == 0, output[-3000:]
    resumed = torch.load(tmp_path / "out.pt", weights_only=False)["params"]
    assert_same_model(resumed, torch.load(FIXTURES / "final_2proc.pt"))
