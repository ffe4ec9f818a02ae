"""The issue-9 benchmarks run on CPU and print their figures (tiny shapes; the real ones need a GPU)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
pytestmark = pytest.mark.slow


def run(script: str, *args: str) -> str:
    command = [sys.executable, str(BENCHMARKS / script), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_gpu_throughput_quick_runs_every_method_on_the_tiny_shape():
    out = run("gpu_throughput.py", "--quick", "--device", "cpu")
    for method in ("parablock", "full", "lora"):
        assert re.search(rf"^{method} +[0-9.]+ tokens/s +peak +[0-9.]+ GiB", out, re.MULTILINE), out
    assert re.search(r"exposed wait [0-9.]+% of compute", out)


def test_memory_benchmark_prints_measured_beside_the_formula():
    out = run("memory.py", "--clients", "1", "3", "--hidden", "64", "--layers", "2")
    rows = re.findall(r"^ +(\d+) +([0-9.]+) MB +([0-9.]+) MB +([0-9.]+)", out, re.MULTILINE)
    assert [int(r[0]) for r in rows] == [1, 3]
    assert float(rows[1][2]) > float(rows[0][2])  # the formula grows with the clients


def test_compression_benchmark_quick_prints_a_loss_per_setting():
    out = run("compression.py", "--quick")
    assert len(re.findall(r"^\S+ +\S+-\S+ +[0-9.]+ +[0-9.]+ MB", out, re.MULTILINE)) == 7, out


def test_the_readmes_recipe_memory_table_is_the_formulas_output():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    table = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "recipe_memory.py")], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert table in (root / "README.md").read_text()


def test_cpu_precision_benchmark_times_fp32_and_bf16_on_the_tests_tiny_checkpoint():
    out = run("cpu_precision.py", "--repeats", "1", "--length", "16")
    assert re.search(r"^bf16 instructions in /proc/cpuinfo: ", out, re.MULTILINE), out
    for dtype in ("float32", "bfloat16"):
        assert re.search(rf"^  {dtype} +[0-9.]+ s", out, re.MULTILINE), out
    assert re.search(r"bf16 / fp32 = [0-9.]+", out)
