"""Forward + backward of a Llama on this CPU in float32 and in bfloat16: which `precision` a CPU run should use.

    python benchmarks/cpu_precision.py                       # the tiny checkpoint the tests save
    python benchmarks/cpu_precision.py --shape smollm135m    # a 135M-parameter Llama (SmolLM-135M's shape)
    python benchmarks/cpu_precision.py --isa avx2            # as on a CPU without bf16 instructions

A CPU without native bf16 instructions (x86: avx512_bf16 or amx_bf16) emulates bf16 through fp32, and a
bf16 step costs several times an fp32 one; `parablock` warns about it before training
(:mod:`lightning_parablock.core.cpu_half`). ``--isa avx2`` caps oneDNN and ATen at AVX2 (``ONEDNN_MAX_CPU_ISA``,
``ATEN_CPU_CAPABILITY``, set before torch loads, in a child process), which is what such a CPU runs. The weights
are loaded from a saved checkpoint in each dtype, as ``CausalLMModule(dtype=...)`` loads them; one step is a
forward and a backward of the whole model on one batch; the first step of each dtype is a warm-up, not counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "tiny": None,  # tests/pretrained.py's TINY_LLAMA, saved by its save_tiny_checkpoint
    "smollm135m": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 2048, "tie_word_embeddings": True,
    },
}  # fmt: skip
ISA_CAPS = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per dtype, after one warm-up")
    parser.add_argument("--isa", choices=sorted(ISA_CAPS), default=None, help="cap the instruction set (child process)")
    options = parser.parse_args()
    if options.isa is not None and os.environ.get("ATEN_CPU_CAPABILITY") is None:
        argv = [arg for arg in sys.argv[1:] if arg not in ("--isa", options.isa)]
        environment = {**os.environ, **ISA_CAPS[options.isa]}
        sys.exit(subprocess.run([sys.executable, __file__, *argv, "--isa", options.isa], env=environment).returncode)
    measure(options)


def measure(options: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_parablock.core.cpu_half import NATIVE_INSTRUCTIONS, cpu_flags, missing_half_instructions

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from pretrained import save_tiny_checkpoint

    read = cpu_flags()
    flags = read or frozenset()
    missing = missing_half_instructions(torch.bfloat16, read)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU capability {torch.backends.cpu.get_cpu_capability()}"
          f"{f' (capped: ONEDNN_MAX_CPU_ISA={cap})' if cap else ''}")  # fmt: skip
    lacking = "" if missing is None else f" (missing: {' or '.join(missing)})"
    print(f"bf16 instructions in /proc/cpuinfo: {sorted(flags & set(NATIVE_INSTRUCTIONS[torch.bfloat16])) or 'none'}{lacking}")
    with tempfile.TemporaryDirectory() as folder:
        if SHAPES[options.shape] is None:
            save_tiny_checkpoint(Path(folder))
        else:
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(AutoConfig.for_model(**SHAPES[options.shape])).save_pretrained(folder)
        seconds = {dtype: step_seconds(folder, dtype, options) for dtype in (torch.float32, torch.bfloat16)}
    fp32, bf16 = (statistics.median(seconds[d]) for d in (torch.float32, torch.bfloat16))
    print(f"{options.shape}, batch {options.batch} x {options.length} tokens, forward + backward, median of {options.repeats}:")
    print(f"  float32   {fp32:8.3f} s   {_listed(seconds[torch.float32])}")
    print(f"  bfloat16  {bf16:8.3f} s   {_listed(seconds[torch.bfloat16])}")
    print(f"  bf16 / fp32 = {bf16 / fp32:.2f}")


def step_seconds(folder: str, dtype, options: argparse.Namespace) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (options.batch, options.length), generator=generator)
    times = []
    for _ in range(options.repeats + 1):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    return times[1:]


def _listed(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


if __name__ == "__main__":
    main()
