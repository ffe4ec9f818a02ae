"""The module paths of before the package moved into layers still import for one release, each warning once with
the path that replaced it; the names they hold are the new modules' own objects."""

import importlib
import sys

import pytest
from lightning import LightningDataModule, LightningModule

from lightning_parablock import FederatedBlockStrategy, ParaBlockCallback
from lightning_parablock._moved import MOVED, MovedModuleWarning

NAMED_IN_ISSUE_31 = {
    "strategy": ("strategies.federated_block", "FederatedBlockStrategy"),
    "callback": ("callbacks.parablock", "ParaBlockCallback"),
    "timeline": ("telemetry.timeline", "load_timeline"),
    "schedule": ("core.schedule", "BlockSchedule"),
    "method_config": ("cli.recipe_method", "apply_method"),
}


def fresh_import(monkeypatch, name: str):
    monkeypatch.delitem(sys.modules, name, raising=False)  # a module imports (and warns) once per process
    return importlib.import_module(name)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_old_module_path_imports_and_warns_naming_its_new_path(monkeypatch, old):
    with pytest.warns(DeprecationWarning) as warned:
        module = fresh_import(monkeypatch, f"lightning_parablock.{old}")
    (warning,) = [w for w in warned if issubclass(w.category, MovedModuleWarning)]
    assert warning.filename == __file__  # attributed to the import, not to importlib
    new = [importlib.import_module(f"lightning_parablock.{name}") for name in MOVED[old]]
    for target in new:
        assert f"`{target.__name__}`" in str(warning.message)
        public = [name for name in vars(target) if not name.startswith("_")]
        assert all(getattr(module, name) is getattr(new[0], name, getattr(target, name)) for name in public)


@pytest.mark.parametrize("old", sorted(NAMED_IN_ISSUE_31))
def test_the_old_paths_hold_the_new_objects(monkeypatch, old):
    new, name = NAMED_IN_ISSUE_31[old]
    with pytest.deprecated_call(match=rf"`lightning_parablock\.{old}` has moved to `lightning_parablock\.{new}`"):
        module = fresh_import(monkeypatch, f"lightning_parablock.{old}")
    assert getattr(module, name) is getattr(importlib.import_module(f"lightning_parablock.{new}"), name)


def test_an_old_class_path_in_a_config_still_builds(tmp_path, monkeypatch):
    from helpers import tiny_recipe_args

    from lightning_parablock.cli import ParaBlockCLI

    for old in ("strategy", "callback"):
        monkeypatch.delitem(sys.modules, f"lightning_parablock.{old}", raising=False)
    config = tmp_path / "old_paths.yaml"
    config.write_text(
        "trainer:\n  strategy:\n    class_path: lightning_parablock.strategy.FederatedBlockStrategy\n"
        "  callbacks:\n  - class_path: lightning_parablock.callback.ParaBlockCallback\n"
    )
    args = tiny_recipe_args(tmp_path, "--config", str(config))
    with pytest.deprecated_call():
        cli = ParaBlockCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           auto_configure_optimizers=False, run=False, args=args)  # fmt: skip
    assert isinstance(cli.trainer.strategy, FederatedBlockStrategy)
    assert any(isinstance(callback, ParaBlockCallback) for callback in cli.trainer.callbacks)


def test_a_path_that_never_existed_is_still_not_found():
    with pytest.raises(ModuleNotFoundError, match="lightning_parablock.strategys"):
        importlib.import_module("lightning_parablock.strategys")
