"""Issue 21's benchmarks in their --quick mode: the pretrained model, Table 1 fine-tuning it, the α sweep."""

import json
import re
from pathlib import Path

import pytest
from test_benchmarks import run

pytestmark = pytest.mark.slow


def test_the_pretrained_checkpoint_is_rebuilt_bit_for_bit_and_named_by_its_settings(tmp_path):
    folders = []
    for cache in ("a", "b"):
        out = run("pretrain_tiny.py", "--quick", "--cache", str(tmp_path / cache))
        folders.append(Path(re.search(r"^checkpoint: (.+)$", out, re.MULTILINE).group(1)))
    assert folders[0].name == folders[1].name and folders[0].name.startswith("pretrained-")
    weights = [(folder / "model.safetensors").read_bytes() for folder in folders]
    assert weights[0] == weights[1]
    config = json.loads((folders[0] / "config.json").read_text())
    assert config["hidden_size"] == 256 and config["num_hidden_layers"] == 4


def test_table1_from_pretrained_quick_fine_tunes_every_method_over_multi_megabyte_blocks(tmp_path):
    out = run("table1.py", "--quick", "--from-pretrained", "--no-grid", "--out", str(tmp_path))
    rows = re.findall(r"^(\S+(?: FT)?) +([0-9.]+) +([0-9.]+)% +([0-9.]+) ", out, re.MULTILINE)
    by_title = {title: (float(loss), float(mb)) for title, loss, _, mb in rows}
    assert set(by_title) == {"ParaBlock", "FedBCD", "Full FT", "FedIT", "FFA-LoRA", "FLoRA", "FedCyBGD"}, out
    assert all(0 < loss < 5 for loss, _ in by_title.values())  # a pretrained start: far below ln(128) = 4.85
    assert by_title["ParaBlock"][1] == by_title["FedBCD"][1] >= 2 * 2 * 3.0  # 2 rounds, up and down, 3+ MB blocks
    assert by_title["Full FT"][1] > 3 * by_title["ParaBlock"][1]  # four layers, not one
    assert "fine-tuning pretrained-" in out and "Dirichlet(0.5)" in out
    outcomes = json.loads((tmp_path / "table1.json").read_text())
    assert all(o["curve"] and o["curve"][-1][0] == 2 for o in outcomes)
    assert (tmp_path / "table1_figure2.png").stat().st_size > 0


def test_staleness_sweep_quick_reports_a_paired_gap_per_split_and_reuses_finished_runs(tmp_path):
    out = run("staleness_heterogeneity.py", "--quick", "--out", str(tmp_path))
    gaps = re.findall(r"^ +(\S+) (parablock:\S+) +[0-9.]+ ± [0-9.]+ +([+-][0-9.]+)% ± ", out, re.MULTILINE)
    assert sorted((alpha, variant) for alpha, variant, _ in gaps) == [
        ("0.1", "parablock:random"), ("0.1", "parablock:spaced"), ("iid", "parablock:random"), ("iid", "parablock:spaced")
    ], out  # fmt: skip
    assert len(list((tmp_path / "runs").glob("*.json"))) == 6
    again = run("staleness_heterogeneity.py", "--quick", "--out", str(tmp_path))
    assert "seed 0" not in again.split("\n alpha")[0]  # nothing retrained
    assert again.split("\n alpha")[1] == out.split("\n alpha")[1]
    assert (tmp_path / "staleness_heterogeneity.png").stat().st_size > 0
