"""The final model folder: whatever the module, something loadable is written; nothing the user owns is lost."""

import json

import pytest
import torch
from lightning import LightningModule
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_parablock.cli.output_folder import (
    MARKER,
    STATE_DICT_FILENAME,
    OutputDirError,
    check_output_dir,
    read_marker,
    save_model,
)


class PlainModule(LightningModule):
    """A user's module with no Hugging Face model inside."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 2)


class WrapsHF(LightningModule):
    """A user's module around a Hugging Face model, without `save_pretrained` of its own."""

    def __init__(self, tiny_llama_config):
        super().__init__()
        self.backbone = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llama_config))


def test_a_module_without_save_pretrained_gets_its_state_dict_saved(tmp_path):
    module = PlainModule()
    plan = check_output_dir(tmp_path / "out", [tmp_path / "run"], module)
    assert "state dict of PlainModule" in plan.contents  # said before training
    saved = save_model(module, None, plan, "r1")
    state = torch.load(saved.path / STATE_DICT_FILENAME, weights_only=True)
    assert torch.equal(state["net.weight"], module.net.weight) and read_marker(saved.path)["run"] == "r1"


def test_the_hugging_face_model_inside_a_module_is_saved_loadable(tmp_path, tiny_llama_config):
    module = WrapsHF(tiny_llama_config)
    saved = save_model(module, None, check_output_dir(tmp_path / "out", [], module), "r1")
    reloaded = AutoModelForCausalLM.from_pretrained(saved.path)
    assert torch.equal(reloaded.lm_head.weight, module.backbone.lm_head.weight)
    assert "`backbone`" in saved.contents


def test_a_previous_output_is_replaced_and_the_note_says_whose(tmp_path):
    module = PlainModule()
    first = save_model(module, None, check_output_dir(tmp_path / "out", [], module), "r1")
    second = save_model(module, None, check_output_dir(tmp_path / "out", [], module), "r2")
    assert first.path == second.path and read_marker(second.path)["run"] == "r2"
    assert "replaced the model of run r1" in second.note
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copy left


def test_two_runs_into_the_same_folder_keep_both_models(tmp_path):
    module = PlainModule()
    plan_a = check_output_dir(tmp_path / "out", [], module)
    plan_b = check_output_dir(tmp_path / "out", [], module)  # both checked before either finished
    a = save_model(module, None, plan_a, "a")
    b = save_model(module, None, plan_b, "b")
    assert read_marker(a.path)["run"] == "a" and read_marker(b.path)["run"] == "b" and a.path != b.path
    assert b.path.name == "out-b" and "written by run a during this run" in b.note and str(b.path) in b.note
    assert b.elsewhere and not a.elsewhere


def test_when_writing_fails_at_the_end_the_model_is_kept_and_the_note_says_where(tmp_path):
    module = PlainModule()
    plan = check_output_dir(tmp_path / "gone" / "out", [], module)
    (tmp_path / "gone").write_text("the folder was replaced by a file during training")
    saved = save_model(module, None, plan, "r1", fallback_root=tmp_path / "run")
    assert saved.path == tmp_path / "run" / "parablock_final_model-r1" and str(saved.path) in saved.note
    assert saved.elsewhere
    assert (saved.path / STATE_DICT_FILENAME).is_file()
    assert (tmp_path / "gone").read_text().startswith("the folder")  # untouched


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("run", "this run's own folder"),
        (".", "current directory"),
        ("user", "non-empty folder that parablock did not write"),
        ("file", "is a file"),
        ("file/model", "is a file"),
    ],
)
def test_unsafe_output_folders_are_refused_and_left_as_they_were(tmp_path, monkeypatch, where, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "logs").mkdir(parents=True)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine too")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(OutputDirError, match=message) as error:
        check_output_dir(where, ["run", "run/logs"], PlainModule())
    assert repr(where) in str(error.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_a_users_folder_only_when_asked(tmp_path):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "old.bin").write_text("old")
    plan = check_output_dir(tmp_path / "user", [], PlainModule(), overwrite=True)
    saved = save_model(PlainModule(), None, plan, "r1")
    assert not (saved.path / "old.bin").exists() and json.loads((saved.path / MARKER).read_text())["run"] == "r1"


class FailsToSave(PlainModule):
    def save_pretrained(self, path):
        raise RuntimeError("shared tensors cannot be saved")


def test_a_module_whose_save_pretrained_fails_is_kept_as_a_state_dict(tmp_path):
    module = FailsToSave()
    saved = save_model(module, None, check_output_dir(tmp_path / "out", [], module), "r1", fallback_root=tmp_path / "run")
    assert "RuntimeError: shared tensors" in saved.note and str(saved.path) in saved.note
    assert torch.equal(torch.load(saved.path / STATE_DICT_FILENAME, weights_only=True)["net.bias"], module.net.bias)
    assert not (tmp_path / "out").exists()
