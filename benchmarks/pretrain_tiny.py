"""A small Llama pretrained here, centrally, so that the benchmarks can fine-tune as the paper does.

Pretraining sees four kinds of the synthetic arithmetic task (addition, subtraction, comparison, parity);
fine-tuning (benchmarks/table1.py --from-pretrained) teaches four kinds it has not seen (multiplication,
minimum, doubling, remainder), split non-iid across clients by kind. The model is a 4-layer Llama with hidden
size 256 (intermediate 688, 4 heads, the character tokenizer's 128-entry vocabulary, tied embeddings): 3.2 M
parameters, one decoder layer, a ParaBlock block, is 0.79 M parameters or 3.2 MB in fp32.

The checkpoint is a pure function of the settings below: it is written with ``save_pretrained`` under
benchmarks/.cache/pretrained-<hash of the settings>/ and rebuilt from the seed when missing, never fetched.
A build takes a few minutes on 2 CPU cores.

    python benchmarks/pretrain_tiny.py [--steps 1200] [--quick] [--cache benchmarks/.cache]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lightning_parablock import CausalLMModule
from lightning_parablock.core.rng import Stream, stream_generator
from lightning_parablock.data import SyntheticArithmeticDataModule
from lightning_parablock.data.formatting import SFTCollator

CACHE = Path(__file__).resolve().parent / ".cache"
PRETRAIN_KINDS = ("addition", "subtraction", "comparison", "parity")
FINETUNE_KINDS = ("multiplication", "minimum", "doubling", "remainder")
MODEL_CONFIG = {
    "model_type": "llama",
    "vocab_size": 128,  # >= the character tokenizer's 105 entries
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class PretrainSettings:
    """Everything the checkpoint depends on; its hash names the cache folder."""

    config: dict = field(default_factory=lambda: dict(MODEL_CONFIG))
    kinds: tuple[str, ...] = PRETRAIN_KINDS
    examples: int = 20_000
    steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def pretrained_checkpoint(settings: PretrainSettings = PretrainSettings(), cache: Path = CACHE) -> Path:
    """The folder of the checkpoint for ``settings``, pretraining it first when it is not in the cache."""
    folder = cache / f"pretrained-{settings.digest()}"
    if (folder / "settings.json").is_file():
        return folder
    started = time.perf_counter()
    module, losses = pretrain(settings)
    partial = folder.with_name(folder.name + ".partial")  # a killed build leaves no folder that looks complete
    shutil.rmtree(partial, ignore_errors=True)
    module.save_pretrained(partial)
    summary = {"settings": asdict(settings), "final_train_loss": losses[-1], "seconds": time.perf_counter() - started}
    (partial / "settings.json").write_text(json.dumps(summary, indent=1))
    partial.rename(folder)
    return folder


def pretrain(settings: PretrainSettings) -> tuple[CausalLMModule, list[float]]:
    """Plain AdamW on every parameter, linear warmup then cosine decay to a tenth, seeded example order."""
    module = CausalLMModule(config=settings.config, learning_rate=settings.learning_rate, seed=settings.seed)
    data = SyntheticArithmeticDataModule(
        num_examples=settings.examples, val_examples=0, seed=settings.seed, kinds=settings.kinds
    )
    data.setup()
    module.configure_model()  # the module builds its model lazily
    optimizer = torch.optim.AdamW(module.parameters(), lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _rate_factor(step, settings))
    collate = SFTCollator(data.tokenizer.pad_token_id)
    module.train()
    losses: list[float] = []
    step, epoch = 0, 0
    while step < settings.steps:
        order = stream_generator(settings.seed, Stream.PRETRAIN_ORDER, epoch)
        loader = DataLoader(data.train_dataset, settings.batch_size, shuffle=True, generator=order, collate_fn=collate)
        for batch in loader:
            loss = module(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            if step % 100 == 0 or step == settings.steps:
                print(f"pretrain step {step}/{settings.steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}",
                      flush=True)  # fmt: skip
            if step == settings.steps:
                break
        epoch += 1
    return module, losses


def _rate_factor(step: int, settings: PretrainSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


QUICK = PretrainSettings(examples=400, steps=20, warmup_steps=5)
"""A smoke-test checkpoint: the same model, barely trained."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=PretrainSettings.steps)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.steps} steps on {QUICK.examples} examples")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where checkpoints are kept, by settings' hash")
    options = parser.parse_args()
    settings = QUICK if options.quick else replace(PretrainSettings(), steps=options.steps)
    folder = pretrained_checkpoint(settings, options.cache)
    summary = json.loads((folder / "settings.json").read_text())
    print(f"checkpoint: {folder}\nfinal train loss {summary['final_train_loss']:.4f},"
          f" built in {summary['seconds']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
