"""Every private Lightning, torch and library symbol the package uses still exists in the pinned versions.

An upgrade that renames one fails here, naming it, instead of silently doing nothing in a signal handler or a hook.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from datasets import Dataset
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from lightning_parablock import _compat

PACKAGE = Path(_compat.__file__).parent


@pytest.mark.parametrize("cls", list(_compat.OVERRIDDEN), ids=lambda c: c.__name__)
def test_every_overridden_private_method_still_exists(cls):
    for name in _compat.OVERRIDDEN[cls]:
        assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name} is gone"


def test_the_signal_handlers_and_the_loop_check_preemption_replaces_still_exist():
    assert callable(getattr(_SignalConnector, _compat.SIGTERM_NOTIFIER, None))
    assert callable(getattr(_SignalConnector, _compat.SLURM_REQUEUE_HANDLER, None))
    assert callable(getattr(_TrainingEpochLoop, _compat.SIGTERM_LOOP_CHECK, None))


def test_the_trainer_attributes_read_through_compat_still_exist():
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert _compat.signal_connector(trainer) is not None
    module = LightningModule()
    assert _compat.attached_trainer(module) is None
    module.trainer = trainer
    assert _compat.attached_trainer(module) is trainer
    assert _compat.cluster_environment(trainer) is not None
    assert isinstance(_compat.progress_bar_metrics(trainer), dict)
    assert _compat.saves_within_epoch(ModelCheckpoint(every_n_train_steps=3))
    assert not _compat.saves_within_epoch(ModelCheckpoint(every_n_epochs=1))


def test_the_default_store_accessor_exists():
    import torch.distributed as dist

    assert callable(dist.distributed_c10d._get_default_store)


def test_the_dataset_fingerprint_exists_and_follows_the_rows():
    rows = Dataset.from_dict({"output": ["a", "b"]})
    assert isinstance(_compat.dataset_fingerprint(rows), str)
    assert _compat.dataset_fingerprint(rows.select([0])) != _compat.dataset_fingerprint(rows)


def test_the_source_row_of_a_selected_shuffled_and_split_dataset_is_the_row_loaded():
    rows = Dataset.from_dict({"row": list(range(10))})
    assert _compat.dataset_source_row(rows, 3) == 3  # no index mapping: the rows are the table's
    picked = rows.shuffle(seed=0).select(range(8)).train_test_split(test_size=0.25, seed=0)["test"]
    assert [_compat.dataset_source_row(picked, i) for i in range(len(picked))] == picked["row"]


def test_the_imported_private_symbols_resolve():
    for name in _compat.__all__:
        assert getattr(_compat, name) is not None, name


def test_no_module_but_compat_reaches_a_private_lightning_torch_or_datasets_symbol():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("lightning", "torch", "datasets"):
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
            private = ("_signal_connector", "_accelerator_connector", "_trainer", "_fingerprint", "_indices")
            if isinstance(node, ast.Attribute) and node.attr in private:
                offenders.append(f"{path.name}: .{node.attr}")
            if isinstance(node, ast.Attribute) and node.attr == "_get_default_store":
                offenders.append(f"{path.name}: .{node.attr}")
    assert not offenders, offenders
