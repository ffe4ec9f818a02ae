"""Tokens/s and peak memory: ParaBlock (bf16-true, fp32 master block) vs full fine-tuning vs LoRA.

Builds a Llama from a config (random weights, no download) in one of three shapes and trains it three
ways, each in a fresh process so peaks do not mix:

- ``parablock``: FederatedBlockStrategy (2 clients, 2 layers per block) + ParaBlockCallback(staleness=1),
  ``precision="bf16-true"``: bf16 weights, the active block trained through fp32 masters;
- ``full``: every parameter trained by AdamW, ``precision="bf16-mixed"`` (fp32 weights);
- ``lora``: peft LoRA (r=16 on every projection), ``precision="bf16-mixed"``.

Prints tokens/s (after warm-up steps, device synchronized only at the ends), peak memory
(``torch.cuda.max_memory_allocated`` on CUDA, peak RSS growth on CPU) and, for ParaBlock, the exposed
exchange wait as a share of compute (the link is modelled infinitely fast: only the real copies and
aggregation are waited for). A method that runs out of memory prints ``OOM``.

    python benchmarks/gpu_throughput.py --shape llama3_8b      # on a GPU (sequence 512)
    python benchmarks/gpu_throughput.py --quick                # tiny shape on CPU: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch.utils.data import Dataset

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, sequence=64),
    "llama3_2_3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, sequence=512),
    "llama3_8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, sequence=512),
}  # fmt: skip
METHODS = ("parablock", "full", "lora")


class RandomTokens(Dataset):
    def __init__(self, size: int, vocab: int, sequence: int) -> None:
        self.tokens = torch.randint(3, vocab, (size, sequence), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def measure(method: str, shape: str, device: str, steps: int, warmup: int, batch_size: int) -> dict:
    """Train with ``method`` in this process; tokens/s after ``warmup`` steps and peak memory."""
    from common import TIMING_ONLY
    from lightning import Callback, Trainer
    from torch.utils.data import DataLoader

    from lightning_parablock import CausalLMModule, FederatedBlockStrategy, ParaBlockCallback

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Clock(Callback):
        def __init__(self) -> None:
            self.steps, self.started, self.ended = 0, None, None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.steps += 1
            if self.steps == warmup:
                sync()
                self.started = time.perf_counter()
            if self.steps == warmup + steps:
                sync()
                self.ended = time.perf_counter()

    options = dict(SHAPES[shape])
    sequence = options.pop("sequence")
    config = dict(model_type="llama", max_position_embeddings=sequence, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, **options)  # fmt: skip
    total_steps = warmup + steps
    clock = Clock()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    module = CausalLMModule(config=config, learning_rate=1e-5)
    callbacks: list = [clock]
    kwargs: dict = dict(max_steps=total_steps, precision="bf16-mixed")
    if method == "parablock":
        clients, rounds = 2, 3
        local_steps = -(-total_steps // (clients * rounds))
        strategy = FederatedBlockStrategy(num_clients=clients, local_steps=local_steps, layers_per_block=2, seed=0)
        callbacks.insert(0, callback := ParaBlockCallback(staleness=1))
        kwargs = dict(strategy=strategy, max_epochs=rounds, precision="bf16-true")
        examples = clients * local_steps * batch_size
    else:
        examples = total_steps * batch_size
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            module.model = get_peft_model(module.model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    trainer = Trainer(accelerator="gpu" if cuda else "cpu", devices=1, callbacks=callbacks, **TIMING_ONLY, **kwargs)
    loader = DataLoader(RandomTokens(examples, config["vocab_size"], sequence), batch_size=batch_size, shuffle=False)
    try:
        trainer.fit(module, loader)
    except torch.OutOfMemoryError:
        return dict(method=method, oom=True)
    measured = clock.steps - warmup
    seconds = (clock.ended or time.perf_counter()) - clock.started
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    peak = torch.cuda.max_memory_allocated() if cuda else rss_growth
    result = dict(method=method, tokens_per_second=min(measured, steps) * batch_size * sequence / seconds, peak=peak)
    if method == "parablock":
        summary = callback.summary()
        result["exposed_wait_share"] = summary.exposed_wait_seconds / max(summary.compute_seconds, 1e-9)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--quick", action="store_true", help="tiny shape, few steps: checks that it runs")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child run: print JSON
    options = parser.parse_args()
    if options.quick:
        options.shape, options.steps, options.warmup = "tiny", 6, 2
    if options.one is not None:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        result = measure(options.one, options.shape, options.device, options.steps, options.warmup, options.batch_size)
        print(json.dumps(result), flush=True)
        return
    print(f"shape {options.shape}, sequence {SHAPES[options.shape]['sequence']}, batch {options.batch_size},"
          f" device {options.device}" + (f" ({torch.cuda.get_device_name()})" if options.device == "cuda" else ""))
    for method in options.methods:
        command = [sys.executable, __file__, "--one", method, "--shape", options.shape, "--device", options.device,
                   "--steps", str(options.steps), "--warmup", str(options.warmup),
                   "--batch_size", str(options.batch_size)]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True)
        if not run.stdout.strip():
            print(f"{method:10s} failed:\n{run.stderr[-2000:]}")
            continue
        result = json.loads(run.stdout.strip().splitlines()[-1])
        if result.get("oom"):
            print(f"{method:10s} OOM")
            continue
        share = result.get("exposed_wait_share")
        extra = "" if share is None else f"  exposed wait {100 * share:.1f}% of compute"
        speed, peak = result["tokens_per_second"], result["peak"] / 2**30
        print(f"{method:10s} {speed:10.1f} tokens/s  peak {peak:7.3f} GiB{extra}")
    print(f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
