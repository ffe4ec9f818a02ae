"""The paper's recipes: generated from one script, stating the paper's settings, and each one runnable.

Running a recipe for real needs the Hub and a GPU; here each is parsed by the `parablock` CLI and run for one
tiny round with the model, data, tokenizer and device swapped for local stand-ins. Everything else, the
federation, the blocks, the schedule, the partition and the precision, comes from the recipe as written.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from lightning import LightningDataModule, LightningModule

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback, StackingAggregator
from lightning_parablock.cli import ParaBlockCLI, main
from lightning_parablock.data import FederatedDataModule, build_char_tokenizer
from lightning_parablock.methods.registry import method

PAPER = Path(__file__).parents[1] / "recipes" / "paper"
LOCAL_TINY = PAPER.parent / "local_tiny.yaml"
FIXTURES = Path(__file__).parent / "fixtures"
RECIPES = sorted(path.stem for path in PAPER.glob("*.yaml"))
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,  # divisible by every layers_per_block the recipes use
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
COPIES = 16  # the fixtures repeated, so 50 clients and Dirichlet(0.01) still give every client data


def _generator():
    spec = importlib.util.spec_from_file_location("make_recipes", PAPER / "make_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recipe(name):
    return yaml.safe_load((PAPER / f"{name}.yaml").read_text())


def _staleness(recipe):
    """The recipe's staleness: written where it is not its method's own."""
    return recipe["trainer"]["callbacks"][0]["init_args"].get("staleness", method(recipe["method"]).staleness)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A saved character tokenizer and the fixtures, repeated, in the recipes' schemas."""
    root = tmp_path_factory.mktemp("recipes")
    build_char_tokenizer().save_pretrained(root / "tokenizer")
    alpaca = json.loads((FIXTURES / "alpaca_gpt4.json").read_text())
    (root / "alpaca.json").write_text(json.dumps(alpaca * COPIES))
    math = (FIXTURES / "mathinstruct.jsonl").read_text()
    (root / "math.jsonl").write_text(math * COPIES)
    return root


def overrides(name, root):
    """The recipe, then the shipped override file for local files and a tiny model, then this test's paths."""
    recipe = _recipe(name)
    staleness = _staleness(recipe)
    data_file = root / ("math.jsonl" if name.startswith("mathinstruct") else "alpaca.json")
    return [
        "--config", str(PAPER / f"{name}.yaml"),
        "--config", str(LOCAL_TINY),
        "--trainer.max_epochs", str(staleness + 1),  # the callback needs more rounds than the staleness
        "--trainer.default_root_dir", str(root / "runs"),
        "--data.init_args.tokenizer", str(root / "tokenizer"),
        "--data.init_args.cache_dir", str(root / "datasets_cache"),
        "--data.init_args.dataset.data_files", str(data_file),
        "--data.init_args.eval_dataset.data_files", json.dumps({"test": str(FIXTURES / "gsm8k_test.parquet")}),
    ]  # fmt: skip


def test_the_local_override_file_states_the_tiny_model_the_tests_use():
    local = yaml.safe_load(LOCAL_TINY.read_text())
    assert local["model"]["init_args"]["config"] == TINY_LLAMA and local["trainer"]["accelerator"] == "cpu"


def test_recipes_are_what_the_generator_writes():
    generator = _generator()
    experiments = generator.experiments()
    assert sorted(experiments) == RECIPES
    for name, (summary, config) in experiments.items():
        assert (PAPER / f"{name}.yaml").read_text() == generator.render(name, summary, config), (
            f"recipes/paper/{name}.yaml is stale: run `python recipes/paper/make_recipes.py`"
        )


@pytest.mark.parametrize(
    ("name", "blocks", "rounds"),
    [
        ("alpaca_llama3_8b", 16, 32),
        ("mathinstruct_llama3_8b", 16, 32),
        ("alpaca_llama32_3b", 14, 28),
        ("mathinstruct_llama32_3b", 14, 28),
        ("mathinstruct_qwen25_15b", 14, 28),
    ],
)
def test_main_recipes_state_the_papers_settings(name, blocks, rounds):
    recipe = _recipe(name)
    trainer, data = recipe["trainer"], recipe["data"]["init_args"]
    strategy = trainer["strategy"]["init_args"]
    layers = {"llama3_8b": 32, "llama32_3b": 28, "qwen25_15b": 28}[name.split("_", 1)[1]]
    assert layers // strategy["layers_per_block"] == blocks and trainer["max_epochs"] == rounds
    assert strategy["num_clients"] == 10 and strategy["schedule"] == "random" and strategy["global_lr"] == 1.0
    assert data["batch_size"] * trainer["accumulate_grad_batches"] == 4
    assert recipe["method"] == "parablock" and _staleness(recipe) == 1
    assert trainer["accelerator"] == "gpu" and trainer["devices"] == 1 and trainer["precision"].startswith("bf16")
    assert recipe["model"]["init_args"]["model_name_or_path"] == data["tokenizer"]
    if name.startswith("alpaca"):
        assert data["dataset"]["path"] == "vicgalle/alpaca-gpt4"
        assert (data["partition"], data["alpha"]) == ("cluster", 0.1)
    else:
        assert data["dataset"] == {"path": "TIGER-Lab/MathInstruct", "max_examples": 50000}
        assert (data["partition"], data["label_column"], data["alpha"]) == ("dirichlet", "source", 0.6)
        assert data["eval_dataset"]["path"] == "openai/gsm8k"


@pytest.mark.parametrize(
    ("name", "path", "value"),
    [
        ("alpaca_llama3_8b_fedbcd", "method", "fedbcd"),
        ("mathinstruct_llama3_8b_staleness_2", "trainer.callbacks.0.init_args.staleness", 2),
        ("mathinstruct_llama3_8b_cross_silo", "trainer.strategy.init_args.num_clients", 50),
        ("mathinstruct_llama3_8b_cross_silo", "trainer.strategy.init_args.participation", 0.2),
        ("mathinstruct_llama3_8b_blocks_partial", "trainer.strategy.init_args.layer_split", "attention_mlp"),
        ("mathinstruct_llama3_8b_blocks_4", "trainer.strategy.init_args.layers_per_block", 4),
        ("mathinstruct_llama3_8b_schedule_reverse", "trainer.strategy.init_args.schedule", "reverse"),
        ("mathinstruct_llama3_8b_iid", "data.init_args.partition", "iid"),
        ("mathinstruct_llama3_8b_extreme", "data.init_args.alpha", 0.01),
        ("alpaca_llama3_8b_bandwidth_50", "trainer.callbacks.0.init_args.link.init_args.bandwidth", "50MB/s"),
        ("alpaca_llama3_8b_batch_8", "trainer.accumulate_grad_batches", 2),
        ("alpaca_llama3_8b_full_ft", "method", "full_ft"),
        ("alpaca_llama3_8b_full_ft", "trainer.max_epochs", 3),
        ("alpaca_llama3_8b_fedit", "method", "fedit"),
        ("alpaca_llama3_8b_ffa_lora", "method", "ffa_lora"),
        ("alpaca_llama3_8b_flora", "method", "flora"),
        ("mathinstruct_llama3_8b_fedcybgd", "method", "fedcybgd"),
        ("mathinstruct_llama3_8b_fedcybgd", "trainer.max_epochs", 32),  # cycles: the CLI trains 32 x 10 epochs
    ],
)
def test_ablations_change_what_they_name(name, path, value):
    node = _recipe(name)
    for key in path.split("."):
        node = node[int(key)] if key.isdigit() else node[key]
    assert node == value


METHOD_ONLY = {"full_ft": {"trainer.max_epochs"}, "fedit": {"model.init_args.learning_rate"}}
METHOD_ONLY |= {name: METHOD_ONLY["fedit"] for name in ("ffa_lora", "flora")}


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    if isinstance(node, list):
        return {k: v for i, value in enumerate(node) for k, v in _leaves(value, f"{prefix}{i}.").items()}
    return {prefix[:-1]: node}


@pytest.mark.parametrize("name", ["fedbcd", "full_ft", "fedit", "ffa_lora", "flora", "fedcybgd"])
@pytest.mark.parametrize("data", ["alpaca", "mathinstruct"])
def test_method_recipes_differ_from_parablocks_only_by_the_method_line(data, name):
    base, other = _leaves(_recipe(f"{data}_llama3_8b")), _leaves(_recipe(f"{data}_llama3_8b_{name}"))
    names = {"trainer.logger.init_args.name", "trainer.default_root_dir", "output_dir"}  # the run's own folders
    differ = {key for key in base.keys() | other.keys() if base.get(key) != other.get(key)} - names
    assert differ == {"method"} | METHOD_ONLY.get(name, set())


@pytest.mark.parametrize("name", ["fedbcd", "full_ft", "fedit", "ffa_lora", "flora", "fedcybgd"])
def test_the_method_line_builds_the_methods_strategy_callback_and_module(name, stand_ins):
    cli = ParaBlockCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=[*overrides(f"alpaca_llama3_8b_{name}", stand_ins), "--trainer.max_epochs", "2"],
    )  # fmt: skip
    spec, strategy = method(name), cli.trainer.strategy
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ParaBlockCallback))
    assert type(strategy) is spec.strategy_class and callback.staleness == spec.staleness
    assert strategy.options.block_patterns == spec.strategy_args.get("block_patterns")
    assert isinstance(callback.aggregator, StackingAggregator) == (name == "flora")
    assert (cli.model.hparams.get("lora") is not None) == spec.lora
    assert cli.trainer.max_epochs == (2 * strategy.options.num_clients if name == "fedcybgd" else 2)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_parses_and_builds(name, stand_ins):
    cli = ParaBlockCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=overrides(name, stand_ins),
    )
    recipe = _recipe(name)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, FederatedBlockStrategy) and isinstance(cli.datamodule, FederatedDataModule)
    assert strategy.options.num_clients == recipe["trainer"]["strategy"]["init_args"]["num_clients"]
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ParaBlockCallback))
    assert callback.staleness == _staleness(recipe)
    assert cli.datamodule.hparams.partition == recipe["data"]["init_args"]["partition"]


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_runs_a_tiny_round(name, stand_ins, capsys):
    main(["fit", *overrides(name, stand_ins)])
    out = capsys.readouterr().out
    assert "ParaBlock run summary" in out and "held-out loss" in out
