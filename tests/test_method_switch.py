"""One line of a recipe switches the method (`method: fedit` / `--method fedit`); everything else stays the config's.

The switch is applied to the parsed config before anything is built: a bad name or a setting the method decides
otherwise is refused in one line naming both, before training starts.
"""

import json
from pathlib import Path

import pytest
import yaml
from helpers import tiny_recipe_args
from lightning import LightningDataModule, LightningModule

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback, StackingAggregator
from lightning_parablock.cli import ParaBlockCLI, main
from lightning_parablock.methods.registry import METHODS, identify, method
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
    assert (options.num_clients, options.local_steps, options.seed, options.weighting) == (2, 2, 0, "samples")
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
