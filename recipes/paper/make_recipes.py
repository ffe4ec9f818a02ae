"""Write ``recipes/paper/*.yaml``: the ParaBlock paper's experiments (arXiv 2511.19959) as LightningCLI configs.

Every file is complete, runnable alone as ``parablock fit --config recipes/paper/NAME.yaml``; they are generated
so the settings they share live in one place. After editing this script run ``python recipes/paper/make_recipes.py``;
``tests/test_recipes.py`` fails while the files and the script disagree.

From the paper: 10 clients; blocks of 2 decoder layers (16 for Llama 3-8B, 14 for Llama 3.2-3B); 32 / 28 rounds;
a random block per round; AdamW locally; global step η = 1; effective batch 4; Dirichlet(0.1) over clustered
Alpaca-GPT4 instructions and Dirichlet(0.6) over MathInstruct's ``source`` (a 50,000-example sample); cross-silo
20% of 50 clients; links of 50/100/150 MB/s. Not stated there, and chosen here (marked ASSUMED in the files):
local steps, learning rate, sequence length, the number of instruction clusters, the validation hold-out.

The other methods of the paper's Table 1 (``lightning_parablock.methods.registry``) run on the same data, model and link:
every recipe starts with a ``method:`` line, and a method's recipe differs from the ParaBlock one by that line and
only by what is truly the method's (see ``lightning_parablock.cli.recipe_method``): Full FT runs 3 rounds as in the
paper; FedIT, FFA-LoRA and FLoRA train LoRA adapters (rank 32, ``LORA_DEFAULTS``) at a larger learning rate;
FedCyBGD reads ``max_epochs`` as cycles (32 cycles over 10 clients are 320 epochs, converted by the CLI). LoRA's
alpha, dropout, target modules and learning rate are ASSUMED.
"""

import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from lightning_parablock.files import write_text_atomic
from lightning_parablock.methods.registry import METHODS
from lightning_parablock.methods.registry import method as method_settings

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))
from recipe_memory import statement as memory_statement  # noqa: E402 - the formula lives with the benchmarks

MODELS = {
    "llama3_8b": {"checkpoint": "meta-llama/Meta-Llama-3-8B", "title": "Llama 3-8B", "layers": 32, "rounds": 32},
    "llama32_3b": {"checkpoint": "meta-llama/Llama-3.2-3B", "title": "Llama 3.2-3B", "layers": 28, "rounds": 28},
    # Table 6; rounds ASSUMED as for the 28-layer Llama 3.2-3B (14 blocks of 2 layers)
    "qwen25_15b": {
        "checkpoint": "Qwen/Qwen2.5-1.5B-Instruct",
        "title": "Qwen2.5-1.5B-Instruct",
        "layers": 28,
        "rounds": 28,
    },
}
MAIN_MODELS = ("llama3_8b", "llama32_3b")

DATASETS = {
    "alpaca": {
        "title": "Alpaca-GPT4",
        "data": {
            "dataset": {"path": "vicgalle/alpaca-gpt4"},
            "partition": "cluster",
            "num_clusters": 10,  # ASSUMED
            "alpha": 0.1,
        },
    },
    "mathinstruct": {
        "title": "MathInstruct",
        "data": {
            "dataset": {"path": "TIGER-Lab/MathInstruct", "max_examples": 50000},
            "eval_dataset": {"path": "openai/gsm8k", "split": "test"},
            "partition": "dirichlet",
            "label_column": "source",
            "alpha": 0.6,
        },
    },
}

GSM8K_CALLBACK = {
    "class_path": "lightning_parablock.eval.GSM8KEvaluation",
    "init_args": {"every_n_rounds": 8, "batch_size": 16, "max_new_tokens": 256},
}
LOCAL_STEPS = 50  # ASSUMED: K, optimizer steps per client and round
LEARNING_RATE = 1.0e-5  # ASSUMED: AdamW, full-parameter fine-tuning of the active block
MAX_LENGTH = 512  # ASSUMED
VAL_FRACTION = 0.01  # ASSUMED: held out from the training data for the global model's loss
LORA_LEARNING_RATE = 2.0e-4  # ASSUMED
FULL_FT_ROUNDS = 3  # the paper runs Full FT (FedAvg of the whole model) for 3 rounds
BASELINES = ("full_ft", "fedit", "ffa_lora", "flora", "fedcybgd")  # of the paper's Table 1, beside ParaBlock and FedBCD


def recipe(
    data: str,
    model: str,
    *,
    staleness: Optional[int] = None,
    layers_per_block: int = 2,
    layer_split: str = "none",
    schedule: str = "random",
    num_clients: int = 10,
    participation: float = 1.0,
    partition: Optional[str] = None,
    alpha: Optional[float] = None,
    batch_size: int = 4,
    accumulate: int = 1,
    bandwidth: str = "100MB/s",
    method: str = "parablock",
) -> dict[str, Any]:
    """One experiment: the paper's defaults for ``data`` on ``model``, with the given changes.

    ``method`` is the config's ``method:`` line: the CLI sets the strategy class, its blocks, the
    staleness, the aggregator and LoRA from it (the paper's LoRA rank 32 is ``LORA_DEFAULTS``).
    ``staleness`` is written only when given (ParaBlock with s >= 2); by default it is the method's.
    """
    spec, dataset = MODELS[model], DATASETS[data]
    settings = method_settings(method)
    data_args = {
        **dataset["data"],
        "tokenizer": spec["checkpoint"],
        "val_fraction": VAL_FRACTION,
        "prompt_format": "alpaca_lora",
        "max_length": MAX_LENGTH,
        "batch_size": batch_size,
        "seed": 0,
    }
    if partition is not None:
        data_args["partition"] = partition
    if alpha is not None:
        data_args["alpha"] = alpha
    strategy = {
        "num_clients": num_clients,
        "local_steps": LOCAL_STEPS,
        "layers_per_block": layers_per_block,
        "layer_split": layer_split,
        "schedule": schedule,
        "global_lr": 1.0,
        "participation": participation,
        "seed": 0,
        "offload_deltas": True,  # N x (s + 1) fp32 blocks in host memory: 1.75 GB each for an 8B 2-layer block
    }
    callback: dict[str, Any] = {} if staleness is None else {"staleness": staleness}
    callback["link"] = {"class_path": "lightning_parablock.SimulatedLink", "init_args": {"bandwidth": bandwidth}}
    # bf16-mixed trains fp32 weights: the checkpoint (bf16 on the Hub) loads straight in fp32
    module = {"model_name_or_path": spec["checkpoint"], "dtype": "float32", "learning_rate": LEARNING_RATE}
    if settings.lora:
        module["learning_rate"] = LORA_LEARNING_RATE
    rounds = FULL_FT_ROUNDS if method == "full_ft" else spec["rounds"]  # cycles for FedCyBGD
    return {
        "method": method,
        "seed_everything": 0,
        "trainer": {
            "accelerator": "gpu",
            "devices": 1,
            "precision": "bf16-mixed",
            "max_epochs": rounds,
            "accumulate_grad_batches": accumulate,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs/paper"}},
            "enable_checkpointing": False,
            "num_sanity_val_steps": 0,
            "check_val_every_n_epoch": 8,
            "strategy": {"class_path": "lightning_parablock.FederatedBlockStrategy", "init_args": strategy},
            "callbacks": [
                {"class_path": "lightning_parablock.ParaBlockCallback", "init_args": callback},
                # after ParaBlockCallback: it evaluates the global model, on the datamodule's eval split
                *([GSM8K_CALLBACK] if "eval_dataset" in data_args else []),
            ],
        },
        "model": {
            "class_path": "lightning_parablock.CausalLMModule",
            "init_args": module,
        },
        "data": {"class_path": "lightning_parablock.data.FederatedDataModule", "init_args": data_args},
    }


def experiments() -> dict[str, tuple[str, dict[str, Any]]]:
    """File name to (what it reproduces, config)."""
    runs: dict[str, tuple[str, dict[str, Any]]] = {}
    for model in MAIN_MODELS:
        for data in DATASETS:
            title = f"ParaBlock on {DATASETS[data]['title']} with {MODELS[model]['title']}"
            runs[f"{data}_{model}"] = (f"{title}: the main result.", recipe(data, model))
    runs["mathinstruct_qwen25_15b"] = (
        "ParaBlock on MathInstruct with Qwen2.5-1.5B-Instruct (the paper's Table 6).",
        recipe("mathinstruct", "qwen25_15b"),
    )
    for data in DATASETS:
        base = f"{data}_llama3_8b"
        runs[f"{base}_fedbcd"] = (
            "FedBCD baseline: the same run with communication not overlapped (staleness 0).",
            recipe(data, "llama3_8b", method="fedbcd"),
        )
        runs[f"{base}_cross_silo"] = (
            "Cross-silo: 20% of 50 clients train each round.",
            recipe(data, "llama3_8b", num_clients=50, participation=0.2),
        )
    math = "mathinstruct_llama3_8b"
    runs[f"{math}_blocks_partial"] = (
        "Block size ablation: attention and MLP of each layer are separate blocks.",
        recipe("mathinstruct", "llama3_8b", layers_per_block=1, layer_split="attention_mlp"),
    )
    for layers in (1, 4):
        runs[f"{math}_blocks_{layers}"] = (
            f"Block size ablation: {layers} layer(s) per block.",
            recipe("mathinstruct", "llama3_8b", layers_per_block=layers),
        )
    for schedule in ("sequential", "reverse"):
        runs[f"{math}_schedule_{schedule}"] = (
            f"Block schedule ablation: {schedule} order.",
            recipe("mathinstruct", "llama3_8b", schedule=schedule),
        )
    runs[f"{math}_iid"] = ("Heterogeneity ablation: iid clients.", recipe("mathinstruct", "llama3_8b", partition="iid"))
    runs[f"{math}_extreme"] = (
        "Heterogeneity ablation: extreme label skew, Dirichlet(0.01).",
        recipe("mathinstruct", "llama3_8b", alpha=0.01),
    )
    runs[f"{math}_staleness_2"] = (
        "Staleness ablation: deltas aggregated two rounds after they are trained.",
        recipe("mathinstruct", "llama3_8b", staleness=2),
    )
    for data in DATASETS:
        for baseline in BASELINES:
            runs[f"{data}_llama3_8b_{baseline}"] = (
                f"{method_settings(baseline).title} baseline of the paper's Table 1 on {DATASETS[data]['title']}.",
                recipe(data, "llama3_8b", method=baseline),
            )
    alpaca = "alpaca_llama3_8b"
    for bandwidth in (50, 150):
        runs[f"{alpaca}_bandwidth_{bandwidth}"] = (
            f"Runtime at {bandwidth} MB/s links (100 MB/s elsewhere).",
            recipe("alpaca", "llama3_8b", bandwidth=f"{bandwidth}MB/s"),
        )
    runs[f"{alpaca}_batch_2"] = ("Effective batch 2 (4 elsewhere).", recipe("alpaca", "llama3_8b", batch_size=2))
    runs[f"{alpaca}_batch_8"] = (
        "Effective batch 8: 4 examples x 2 accumulated micro-batches.",
        recipe("alpaca", "llama3_8b", accumulate=2),
    )
    return runs


def render(name: str, summary: str, config: dict[str, Any]) -> str:
    header = [
        f"# {summary}",
        f"#   parablock fit --config recipes/paper/{name}.yaml",
        "# Generated by recipes/paper/make_recipes.py, which documents the settings: edit it, not this file.",
        "# ASSUMED (not stated in the paper): local_steps, learning_rate, max_length, val_fraction, num_clusters.",
        "# Another method of the paper's Table 1, all else equal: change the `method` line or add `--method NAME`",
        f"# ({', '.join(METHODS)}; with fedcybgd, max_epochs counts cycles).",
        "# bf16-mixed: the checkpoint loads straight in fp32 (dtype: float32) and trains under bf16 autocast;",
        "# precision: bf16-true trains bf16 weights through fp32 masters in less memory (README, the precision matrix).",
        *memory_statement(config),
    ]
    config = {**config, "output_dir": f"runs/paper/{name}/final_model"}
    config["trainer"] = {**config["trainer"], "default_root_dir": f"runs/paper/{name}"}
    logger = config["trainer"]["logger"]
    config["trainer"]["logger"] = {**logger, "init_args": {**logger["init_args"], "name": name}}
    return "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False, width=120)


def main() -> None:
    # Render everything before touching a file: an error while editing this script leaves the recipes as they were.
    rendered = {f"{name}.yaml": render(name, summary, config) for name, (summary, config) in experiments().items()}
    for path in HERE.glob("*.yaml"):
        if path.name not in rendered:
            path.unlink()
    for filename, text in rendered.items():
        write_text_atomic(HERE / filename, text)


if __name__ == "__main__":
    main()
