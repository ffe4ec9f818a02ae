"""One line of a recipe switches the method (`method: fedit` / `--method fedit`); everything else stays the config's.

The switch is applied to the parsed config before anything is built: a bad name or a setting the method decides
otherwise is refused in one line naming both, before training starts.
"""

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import tiny_recipe_args
from jsonargparse import ArgumentParser, Namespace
from lightning import LightningDataModule, LightningModule
from pretrained import save_tiny_checkpoint

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback, StackingAggregator
from lightning_parablock.cli import ParaBlockCLI, main
from lightning_parablock.cli.recipe_method import apply_method
from lightning_parablock.methods.registry import METHODS, identify, method
from lightning_parablock.strategies.federation_options import FederationOptions
from lightning_parablock.telemetry.timeline import TIMELINE_FILENAME


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    two_clients = ["--trainer.strategy.init_args.num_clients", "2", "--trainer.strategy.init_args.local_steps", "2"]
    return tiny_recipe_args(tmp_path, *two_clients, *extra)


def build(tmp_path: Path, *extra: str) -> ParaBlockCLI:
    return ParaBlockCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=tiny(tmp_path, *extra),
    )  # fmt: skip


def refusal(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("parablock: error:")]
    assert len(errors) == 1  # one line, no traceback
    return errors[0]


@pytest.mark.parametrize("name", METHODS)
def test_the_method_argument_builds_the_methods_objects_and_keeps_the_rest(name, tmp_path):
    cli = build(tmp_path, "--method", name)
    spec, strategy = method(name), cli.trainer.strategy
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ParaBlockCallback))
    assert type(strategy) is spec.strategy_class and callback.staleness == spec.staleness
    assert strategy.options.block_patterns == spec.strategy_args.get("block_patterns")
    assert isinstance(callback.aggregator, StackingAggregator) == (spec.aggregator_class is StackingAggregator)
    assert (cli.model.hparams.lora is not None) == spec.lora
    assert identify(strategy, callback.staleness, callback.aggregator) == name
    # what the method does not decide stays the config's
    options = strategy.options
    assert (options.num_clients, options.local_steps, options.seed, callback.aggregator.weighting) == (2, 2, 0, "samples")
    assert callback.link.latency == "20ms" and cli.model.hparams.learning_rate == 0.003
    assert cli.trainer.max_epochs == (2 * 2 if name == "fedcybgd" else 2)  # FedCyBGD: 2 cycles over 2 clients
    assert cli.trainer.check_val_every_n_epoch == (10 * 2 if name == "fedcybgd" else 10)


def test_the_command_line_method_overrides_the_configs_method_line(tmp_path):
    cli = build(tmp_path, "--method", "flora")
    assert type(cli.trainer.strategy).__name__ == "FLoRAStrategy"
    assert cli.config.method is None  # applied: the saved config holds the settings it chose


def test_a_bad_method_name_is_refused_naming_the_accepted_ones(tmp_path, capsys):
    message = refusal(capsys, tiny(tmp_path, "--method", "fedprox"))
    assert "`method`" in message and "fedprox" in message
    assert all(name in message for name in METHODS)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--method", "flora", "--trainer.callbacks.staleness", "1"],
            "`method: flora` sets `trainer.callbacks[0].init_args.staleness` to 0, but the config sets 1",
        ),
        (
            ["--method", "parablock", "--trainer.callbacks.staleness", "0"],
            "`method: parablock` sets `trainer.callbacks[0].init_args.staleness` to '>= 1', but the config sets 0",
        ),
        (
            ["--method", "fedit", "--trainer.strategy.init_args.block_patterns", '[["lora_B"]]'],
            "`method: fedit` sets `trainer.strategy.init_args.block_patterns` to [['lora_']], but the config sets",
        ),
        (
            ["--method", "fedbcd", "--model.init_args.lora", '{"r": 4}'],
            "`method: fedbcd` sets `model.init_args.lora` to None, but the config sets {'r': 4}",
        ),
        (
            ["--method", "fedit", "--trainer.callbacks.aggregator", "lightning_parablock.StackingAggregator"],
            "sets `trainer.callbacks[0].init_args.aggregator` to 'lightning_parablock.Aggregator'",
        ),
        (
            ["--trainer.strategy.class_path", "lightning_parablock.FLoRAStrategy", "--method", "fedcybgd"],
            "`method: fedcybgd` sets `trainer.strategy.class_path` to 'lightning_parablock.FedCyBGDStrategy'",
        ),
    ],
    ids=["flora-staleness", "parablock-staleness", "fedit-blocks", "fedbcd-lora", "fedit-stacking", "strategy-class"],
)
def test_a_setting_the_method_decides_otherwise_is_refused_naming_both(extra, expected, tmp_path, capsys):
    message = refusal(capsys, tiny(tmp_path, *extra))
    assert expected in message, message
    assert not (tmp_path / "run").exists()


def test_parablock_keeps_a_longer_staleness_and_settings_that_agree_are_accepted(tmp_path):
    cli = build(tmp_path, "--trainer.callbacks.staleness", "2", "--trainer.max_epochs", "3")
    assert next(c for c in cli.trainer.callbacks if isinstance(c, ParaBlockCallback)).staleness == 2
    cli = build(tmp_path, "--method", "flora", "--trainer.callbacks.staleness", "0")
    assert type(cli.trainer.strategy).__name__ == "FLoRAStrategy"


def test_without_a_method_line_the_config_is_used_as_written(tmp_path):
    cli = build(tmp_path, "--method", "null", "--trainer.callbacks.staleness", "0")
    strategy = cli.trainer.strategy
    assert type(strategy) is FederatedBlockStrategy and strategy.options.block_patterns is None


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_the_tiny_recipe_trains_with_every_method_and_its_timeline_names_it(name, tmp_path, capsys):
    main(["fit", *tiny(tmp_path, "--method", name)])
    assert "ParaBlock run summary" in capsys.readouterr().out
    timeline = json.loads(next((tmp_path / "run").rglob(TIMELINE_FILENAME)).read_text())
    assert timeline["method"] == name
    rounds = [r for r in timeline["records"] if not r["flush"]]
    assert len(rounds) == (4 if name == "fedcybgd" else 2)


@pytest.mark.slow
def test_the_saved_config_of_a_method_run_repeats_it_without_converting_twice(tmp_path, capsys):
    main(["fit", *tiny(tmp_path, "--method", "fedcybgd", "--trainer.max_epochs", "1")])
    saved = yaml.safe_load(next((tmp_path / "run").rglob("config.yaml")).read_text())
    assert saved["method"] is None and saved["trainer"]["max_epochs"] == 2  # the settings the method chose
    for fit_only in ("ckpt_path", "weights_only"):  # `fit` options: this parses the config without a subcommand
        saved.pop(fit_only, None)
    (tmp_path / "saved.yaml").write_text(yaml.safe_dump(saved))
    cli = ParaBlockCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=["--config", str(tmp_path / "saved.yaml")],
    )  # fmt: skip
    assert (
        type(cli.trainer.strategy).__name__ == "FedCyBGDStrategy" and cli.trainer.max_epochs == 2
    )  # 1 cycle, 2 clients


# ------------------------------------------------------------------ every shipped recipe switches by --method alone

RECIPES = Path(__file__).parents[1] / "recipes"
SHIPPED = sorted(
    str(path.relative_to(RECIPES)) for path in [*RECIPES.glob("*.yaml"), *RECIPES.glob("paper/*.yaml")]
    if not path.name.startswith("local_")  # overrides laid over a recipe, not recipes
)  # fmt: skip


class _ParsedOnly(ParaBlockCLI):
    """The parsed config as a recipe gives it: no method applied, nothing built."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parsed(*args: str) -> Namespace:
    cli = _ParsedOnly(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      run=False, args=list(args))  # fmt: skip
    return cli.config


def built_strategy_and_callback(config: Namespace) -> tuple[FederatedBlockStrategy, ParaBlockCallback]:
    """The strategy and the ParaBlockCallback the switched config builds (what the Trainer would get)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(FederatedBlockStrategy, "strategy")
    parser.add_subclass_arguments(ParaBlockCallback, "callback")
    callback = next(c for c in config.trainer.callbacks if c.class_path.endswith("ParaBlockCallback"))
    built = parser.instantiate_classes(Namespace(strategy=config.trainer.strategy, callback=callback))
    return built.strategy, built.callback


def test_every_shipped_recipe_is_a_full_recipe_naming_its_method():
    assert "llama32_1b_chat.yaml" in SHIPPED and "tiny.yaml" in SHIPPED and len(SHIPPED) > 20
    for name in SHIPPED:
        assert yaml.safe_load((RECIPES / name).read_text()).get("method") in METHODS, name


@pytest.mark.parametrize("recipe", SHIPPED)
def test_every_shipped_recipe_switches_to_every_method_by_the_method_alone(recipe):
    config = parsed("--config", str(RECIPES / recipe))
    for name in METHODS:
        switched = copy.deepcopy(config)
        apply_method(switched, name)
        strategy, callback = built_strategy_and_callback(switched)
        spec = method(name)
        assert type(strategy) is spec.strategy_class and spec.accepts_staleness(callback.staleness), (recipe, name)
        assert identify(strategy, callback.staleness, callback.aggregator) == name, (recipe, name)
        assert (switched.model.init_args.lora is not None) == spec.lora
        assert switched.data == config.data and switched.seed_everything == config.seed_everything  # the rest stays


def test_a_switch_keeps_the_recipes_own_setting_for_its_own_method(tmp_path):
    """ParaBlock's staleness 2 stays under parablock and gives way to FedBCD's 0 under fedbcd, with a note."""
    config = parsed("--config", str(RECIPES / "paper" / "mathinstruct_llama3_8b_staleness_2.yaml"))
    kept = copy.deepcopy(config)
    assert apply_method(kept, "parablock") == [] and kept.trainer.callbacks[0].init_args.staleness == 2
    notes = apply_method(config, "fedbcd")
    assert config.trainer.callbacks[0].init_args.staleness == 0
    assert notes == ["method fedbcd: `trainer.callbacks[0].init_args.staleness: 2` is parablock's setting; it runs with 0"]


def _chat_args(tmp_path: Path, *extra: str) -> list[str]:
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny_chat")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}))
    return [
        "--config", str(RECIPES / "llama32_1b_chat.yaml"), "--config", str(RECIPES / "local_chat_tiny.yaml"),
        "--model.init_args.model_name_or_path", str(checkpoint), "--data.init_args.tokenizer", str(checkpoint),
        "--data.init_args.dataset.data_files", str(data), "--trainer.default_root_dir", str(tmp_path / "runs"),
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["fedbcd", "fedit", "full_ft"])
def test_the_chat_recipe_with_a_users_overlay_switches_by_the_command_line_method(name, tmp_path, capsys):
    mine = tmp_path / "mine.yaml"  # the user's own settings, as in the issue: data and clients
    mine.write_text(yaml.safe_dump({"trainer": {"strategy": {"init_args": {"num_clients": 2}}}}))
    cli = ParaBlockCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=[*_chat_args(tmp_path), "--config", str(mine), "--method", name],
    )  # fmt: skip
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ParaBlockCallback))
    assert identify(cli.trainer.strategy, callback.staleness, callback.aggregator) == name
    assert cli.trainer.strategy.options.num_clients == 2


def test_a_users_own_conflicting_setting_is_refused_naming_the_command_line_way_out(tmp_path, capsys):
    mine = tmp_path / "mine.yaml"  # no `method:` line: its staleness is the user's own
    callbacks = [{"class_path": "lightning_parablock.ParaBlockCallback", "init_args": {"staleness": 2}}]
    mine.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    args = [*_chat_args(tmp_path), "--config", str(mine), "--method", "fedbcd"]
    message = refusal(capsys, args)
    assert "`method: fedbcd` sets `trainer.callbacks[0].init_args.staleness` to 0, but the config sets 2" in message
    assert "`--trainer.callbacks.staleness null`" in message
    cli = ParaBlockCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=[*args, "--trainer.callbacks.staleness", "null"],
    )  # fmt: skip
    assert next(c for c in cli.trainer.callbacks if isinstance(c, ParaBlockCallback)).staleness == 0


def test_a_config_file_naming_its_method_owns_its_settings_and_the_command_line_does_not(tmp_path, capsys):
    written = tmp_path / "parablock_s2.yaml"
    callbacks = [{"class_path": "lightning_parablock.ParaBlockCallback", "init_args": {"staleness": 2}}]
    written.write_text(yaml.safe_dump({"method": "parablock", "trainer": {"callbacks": callbacks}}))
    cli = build(tmp_path, "--config", str(written), "--method", "fedbcd")
    assert next(c for c in cli.trainer.callbacks if isinstance(c, ParaBlockCallback)).staleness == 0
    assert "`trainer.callbacks[0].init_args.staleness: 2` is parablock's setting; it runs with 0" in capsys.readouterr().err
    args = tiny(tmp_path, "--config", str(written), "--method", "fedbcd", "--trainer.callbacks.staleness", "3")
    assert "sets `trainer.callbacks[0].init_args.staleness` to 0, but the config sets 3" in refusal(capsys, args)


# ------------------------------------------------------------------ settings a method does not use

@pytest.mark.parametrize(
    ("name", "option", "value"),
    [("fedit", "layers_per_block", "2"), ("full_ft", "layer_split", "attention_mlp"), ("ffa_lora", "schedule", "reverse"),
     ("flora", "include_head", "true"), ("fedcybgd", "participation", "0.5"), ("fedcybgd", "schedule", "sequential")],
)  # fmt: skip
def test_a_recipe_setting_the_method_does_not_use_is_reset_with_a_note(name, option, value, tmp_path, capsys):
    cli = build(tmp_path, "--method", name, f"--trainer.strategy.init_args.{option}", value)
    assert getattr(cli.trainer.strategy.options, option) == FederationOptions.default(option)
    assert f"method {name}: {option}=" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"layers_per_block": 2}, "`block_patterns` replaces the decoder's blocks, so `layers_per_block=2` does not apply"),
        ({"layer_split": "attention_mlp"}, "so `layer_split='attention_mlp'` does not apply: leave it at its default 'none'"),
        ({"include_embeddings": True}, "so `include_embeddings=True` does not apply"),
        ({"remainder": "last_smaller"}, "so `remainder='last_smaller'` does not apply"),
        ({"schedule": "gradient"}, "`block_patterns` gives one block, which every round trains, so `schedule='gradient'`"),
    ],
)
def test_a_strategy_built_by_hand_refuses_a_decoder_block_option_next_to_block_patterns(options, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        FederatedBlockStrategy(block_patterns=[["lora_"]], **options)
    FederatedBlockStrategy(block_patterns=[r"layers\.0\.", r"layers\.1\."], schedule="sequential")  # two blocks: fine


def test_the_python_method_switch_warns_about_options_the_method_does_not_use():
    with pytest.warns(UserWarning, match=re.escape("method fedit: layers_per_block=2 does not apply")):
        strategy = method("fedit").strategy(num_clients=2, layers_per_block=2)
    assert strategy.options.layers_per_block == 1 and strategy.options.block_patterns == [["lora_"]]
