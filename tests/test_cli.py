"""The `parablock` command and the tiny recipe, end to end."""

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_parablock.cli import main

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")


def run_recipe(tmp_path, *overrides):
    output_dir = tmp_path / "final_model"
    main(
        [
            "fit",
            "--config", RECIPE,
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false",
            "--output_dir", str(output_dir),
            *overrides,
        ]
    )  # fmt: skip
    return output_dir


def summary_losses(text):
    before, after = re.search(r"held-out loss: ([0-9.]+) before -> ([0-9.]+) after", text).groups()
    return float(before), float(after)


def test_shortened_tiny_recipe_trains_reports_and_saves(tmp_path, capsys):
    output_dir = run_recipe(
        tmp_path,
        "--trainer.max_epochs", "3",
        "--trainer.check_val_every_n_epoch", "3",
        "--data.init_args.num_examples", "400",
        "--data.init_args.val_examples", "32",
        "--trainer.strategy.init_args.local_steps", "2",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"rounds: 3 .*bytes moved: [0-9.]+ MB .*measured time: .*exposed comm wait", out)
    before, after = summary_losses(out)
    assert after < before
    assert sorted(p.name for p in output_dir.parent.iterdir() if p.name.startswith(".final_model")) == []  # no staging
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert model.config.num_hidden_layers == 4 and len(tokenizer) == 105
    ids = tokenizer("What is 2 + 3?", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "val/perplexity" in metrics and "parablock/exposed_wait_s" in metrics
    # validate before fit (inference mode) and validation during fit share the perplexity metric
    assert "held-out loss" in out


def test_recipe_with_unknown_strategy_argument_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        run_recipe(tmp_path, "--trainer.strategy.init_args.num_clientz", "3")


@pytest.mark.slow
def test_full_tiny_recipe_learns(tmp_path, capsys):
    run_recipe(tmp_path)
    before, after = summary_losses(capsys.readouterr().out)
    assert after < 0.5 * before


@pytest.mark.slow
def test_overlap_benchmark_runs_and_prints_its_figures():
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "benchmarks" / "overlap.py"
    result = subprocess.run(
        [sys.executable, str(script), "--rounds", "2", "--clients", "2"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"ParaBlock / FedBCD measured time: [0-9.]+", result.stdout)
    assert len(re.findall(r"fp32 blocks per client", result.stdout)) == 3


@pytest.mark.slow
def test_overhead_benchmark_runs_and_prints_its_figures():
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "benchmarks" / "overhead.py"
    result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "=== 1 torch thread" in result.stdout, result.stdout  # then torch's default, where that is more
    for clock in ("wall, whole run", "wall, median step", "cpu, whole run"):
        assert re.search(
            rf"{clock}, median of each repeat's ratio:\n"
            r"  strategy N=1 / bare loop per step: [0-9.]+  \(per repeat: [0-9.]+\)\n"
            r"  plain Lightning / bare loop per step: [0-9.]+  \(per repeat: [0-9.]+\)\n"
            r"  strategy N=2 / N=1 per step: [0-9.]+  \(per repeat: [0-9.]+\)",
            result.stdout,
        ), result.stdout
    assert re.search(r"forward/backward at the bare loop's median \([0-9.]+ ms/step\)", result.stdout)
    assert "command: " in result.stdout and "overhead.py --quick" in result.stdout
