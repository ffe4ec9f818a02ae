"""GPU memory each paper recipe needs, from the formula of DESIGN §4 (computed, not measured).

Per rank: one global model + one turn's working set + the hosted clients' pending fp32 deltas (on the GPU
unless ``offload_deltas``, then in host memory). For a trained block of ``b`` parameters:

- global model: every parameter in the dtype the Trainer's precision trains (``CausalLMModule(dtype="auto")``
  loads it so, and a lower one is refused): fp32, 4 bytes, under ``32-true`` and ``*-mixed``; 2 bytes under
  ``bf16-true`` / ``16-true``;
- working set: ``20·b`` (fp32 master 4, fp32 θ_0 4, fp32 gradient 4, AdamW's two moments 8; no master for fp32
  parameters such as LoRA adapters: ``16·b``) plus the exact global copies of the blocks the client's view
  touches, ``(s+1)·b`` in the parameters' dtype;
- pending deltas: at most ``P·(s+1)`` fp32 blocks, ``4·b`` each, for P participants per round at staleness s
  (each delta comes from one of the last s+1 rounds).

Full FT trains one block that is the whole model; the LoRA methods train adapters (``LORA_DEFAULTS``: r=32 on
every linear layer of the decoder) over a frozen model. Activations come on top and depend on batch and
sequence; they are not in these figures. The parameter counts come from the models' configs (no download).

    python benchmarks/recipe_memory.py            # the README's table, in Markdown
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

RECIPES = Path(__file__).parents[1] / "recipes" / "paper"
GB = 1e9

# From the models' config.json (hidden, intermediate, layers, attention heads, kv heads, vocabulary, tied head,
# q/k/v biases).
SHAPES = {
    "meta-llama/Meta-Llama-3-8B": (4096, 14336, 32, 32, 8, 128256, False, False),
    "meta-llama/Llama-3.2-3B": (3072, 8192, 28, 24, 8, 128256, True, False),
    "Qwen/Qwen2.5-1.5B-Instruct": (1536, 8960, 28, 12, 2, 151936, True, True),
}
LORA_RANK = 32  # lightning_parablock.core.lora.LORA_DEFAULTS["r"], target_modules="all-linear"
BLOCK_METHODS = ("parablock", "fedbcd", "fedcybgd")
LORA_METHODS = ("fedit", "ffa_lora", "flora")
STALENESS = {"parablock": 1}  # every other method is synchronous (0)
# Bytes per weight under each Trainer precision: the module loads in the dtype its precision trains
# (CausalLMModule(dtype="auto"); a lower one is refused), fp32 under 32-true and the mixed precisions.
WEIGHT_BYTES = {"32-true": 4, "bf16-mixed": 4, "16-mixed": 4, "bf16-true": 2, "16-true": 2}


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of a decoder: the whole model, one layer, and the LoRA adapters of every layer."""

    total: int
    layer: int
    lora: int

    @classmethod
    def of(cls, checkpoint: str) -> "ModelSize":
        hidden, inter, layers, heads, kv_heads, vocab, tied, qkv_bias = SHAPES[checkpoint]
        kv = hidden // heads * kv_heads
        linears = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)] + [(hidden, inter)] * 2 + [(inter, hidden)]
        layer = sum(i * o for i, o in linears) + 2 * hidden + ((hidden + 2 * kv) if qkv_bias else 0)
        total = layers * layer + vocab * hidden * (1 if tied else 2) + hidden
        return cls(total=total, layer=layer, lora=layers * sum(LORA_RANK * (i + o) for i, o in linears))


@dataclass(frozen=True)
class Footprint:
    """Bytes one rank holds, by part."""

    model: int
    working_set: int
    deltas: int
    deltas_on_gpu: bool

    @property
    def gpu(self) -> int:
        return self.model + self.working_set + (self.deltas if self.deltas_on_gpu else 0)


def footprint(
    model_bytes: int, trained: int, participants: int, staleness: int, offload: bool, trained_bytes: int = 2
) -> Footprint:
    """The formula: a block of ``trained`` parameters stored in ``trained_bytes`` (half precision: through fp32
    masters) trained by AdamW, ``participants`` per round at ``staleness``, over a model of ``model_bytes``."""
    master = 4 if trained_bytes < 4 else 0
    working = (master + 16) * trained + (staleness + 1) * trained * trained_bytes
    return Footprint(model_bytes, working, participants * (staleness + 1) * 4 * trained, not offload)


def recipe_footprint(config: dict) -> tuple[dict, Footprint]:
    """What a recipe's ``config`` trains and the memory the formula gives it."""
    method = config.get("method", "parablock")
    strategy = config["trainer"]["strategy"]["init_args"]
    callback = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ParaBlockCallback"))
    staleness = callback.get("init_args", {}).get("staleness", STALENESS.get(method, 0))
    size = ModelSize.of(config["model"]["init_args"]["model_name_or_path"])
    weight_bytes = WEIGHT_BYTES[config["trainer"]["precision"]]
    model_bytes = weight_bytes * size.total
    if method in BLOCK_METHODS:
        trained, trained_bytes = strategy["layers_per_block"] * size.layer, weight_bytes
    elif method in LORA_METHODS:
        trained, trained_bytes = size.lora, 4  # peft keeps adapters fp32
        model_bytes += 4 * size.lora
    elif method == "full_ft":
        trained, trained_bytes = size.total, weight_bytes
    else:
        raise ValueError(f"unknown method {method!r}; known: {BLOCK_METHODS + LORA_METHODS + ('full_ft',)}")
    clients = strategy["num_clients"]
    participants = 1 if method == "fedcybgd" else strategy.get("clients_per_round") or math.ceil(
        strategy.get("participation", 1.0) * clients
    )
    fp = footprint(model_bytes, trained, participants, staleness, strategy.get("offload_deltas", False), trained_bytes)
    weights = "fp32" if weight_bytes == 4 else "half-precision (fp32 masters for the trained block)"
    facts = dict(method=method, precision=config["trainer"]["precision"], staleness=staleness, trained=trained, weights=weights)
    return facts, fp


def statement(config: dict) -> list[str]:
    """The recipe's own comment lines on the GPU memory it needs."""
    facts, fp = recipe_footprint(config)
    where = "on the GPU" if fp.deltas_on_gpu else "in host memory (offload_deltas)"
    lines = [
        f"# GPU memory by DESIGN §4's formula (benchmarks/recipe_memory.py), before activations: {fp.gpu / GB:.1f} GB",
        f"# = global model {fp.model / GB:.1f} GB ({facts['weights']} weights under {facts['precision']}) + working set"
        f" {fp.working_set / GB:.1f} GB for {facts['trained'] / 1e9:.3f} B trained parameters;",
        f"# pending deltas up to {fp.deltas / GB:.1f} GB {where}.",
    ]
    if fp.gpu >= 80 * GB:
        lines.append("# It does NOT fit one 80 GB GPU: whole-model masters, gradients and AdamW state.")
    return lines


def table() -> str:
    """Every paper recipe's GPU memory by the formula, as a Markdown table."""
    rows = [
        "| recipe | method | precision | trained params | global model | working set | pending deltas | GPU (no activations) | fits 80 GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in sorted(RECIPES.glob("*.yaml")):
        facts, fp = recipe_footprint(yaml.safe_load(path.read_text()))
        where = "GPU" if fp.deltas_on_gpu else "host"
        rows.append(
            f"| {path.stem} | {facts['method']} | {facts['precision']} | {facts['trained'] / 1e9:.3f} B"
            f" | {fp.model / GB:.1f} GB | {fp.working_set / GB:.1f} GB | {fp.deltas / GB:.1f} GB ({where})"
            f" | {fp.gpu / GB:.1f} GB | {'yes' if fp.gpu < 80 * GB else '**no**'} |"
        )
    return "\n".join(rows)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print(table())


if __name__ == "__main__":
    main()
