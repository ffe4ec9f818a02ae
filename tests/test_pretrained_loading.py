"""Every Hugging Face load the package makes (model, config, tokenizer, the generation config and ``custom_generate``
that come with the model, a peft adapter's base) never runs the checkpoint's own code and never asks at a terminal;
a checkpoint that cannot load is one line naming it. The checkpoints are saved by the tests; their code would write
a marker file when imported, so "nothing ran" is checked, not assumed."""

import builtins
import json
import re

import huggingface_hub
import pytest
import torch
from pretrained import save_custom_code_checkpoint, save_tiny_checkpoint
from test_cli_refusals import assert_nothing_created, refused, snapshot
from test_finetune_recipe import recipe_args

from lightning_parablock import CausalLMModule
from lightning_parablock.data import FederatedDataModule
from lightning_parablock.data.tokenizer import load_tokenizer


@pytest.fixture(autouse=True)
def a_prompt_would_be_answered_yes(monkeypatch):
    """transformers asks "Do you wish to run the custom code? [y/N]" when not told: answer "y", so a load that asked
    would run the checkpoint's code and write the marker."""
    monkeypatch.setattr(builtins, "input", lambda *args: "y")


def load_model(folder):
    module = CausalLMModule(model_name_or_path=str(folder))
    module.configure_model()
    return module.model


def read_config(folder):
    return CausalLMModule(model_name_or_path=str(folder)).model_config


def build_datamodule(folder):
    return FederatedDataModule(dataset={"data_files": "unused.jsonl"}, tokenizer=str(folder))


LOADS = {"model": load_model, "config": read_config, "tokenizer": load_tokenizer, "datamodule": build_datamodule}


@pytest.mark.parametrize("load", list(LOADS))
def test_a_checkpoint_of_an_architecture_only_its_own_code_defines_is_refused_at_every_load(tmp_path, load):
    marker = tmp_path / "its_code_ran"
    folder = save_custom_code_checkpoint(tmp_path / "custom", marker)
    with pytest.raises(ValueError) as refusal:
        LOADS[load](folder)
    message = str(refusal.value)
    assert "\n" not in message and f"{folder}" in message and "never runs a checkpoint's code" in message, message
    assert not marker.exists()


@pytest.mark.parametrize("load", ["model", "config"])
def test_a_known_architecture_loads_with_transformers_own_classes_and_not_the_checkpoints(tmp_path, load):
    marker = tmp_path / "its_code_ran"
    folder = save_custom_code_checkpoint(tmp_path / "custom", marker, model_type="llama")
    loaded = LOADS[load](folder)
    assert type(loaded).__module__.startswith("transformers.")  # LlamaForCausalLM / LlamaConfig, not CustomModel
    if load == "model":
        assert loaded.generate.__func__ is type(loaded).generate  # `custom_generate/generate.py` not loaded
    assert not marker.exists()


@pytest.mark.parametrize("load", ["tokenizer", "datamodule"])
def test_a_tokenizer_whose_class_is_only_in_its_own_code_is_refused(tmp_path, load):
    marker = tmp_path / "its_code_ran"
    folder = save_custom_code_checkpoint(tmp_path / "custom", marker, model_type="llama")
    with pytest.raises(ValueError, match="never runs a checkpoint's code"):
        LOADS[load](folder)
    assert not marker.exists()


def test_a_peft_adapter_over_a_base_that_needs_its_own_code_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = save_tiny_checkpoint(tmp_path / "base")
    adapter = tmp_path / "adapter"
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert load_model(adapter) is not None  # the adapter loads over its plain base
    marker = tmp_path / "its_code_ran"
    save_custom_code_checkpoint(base, marker)  # the same base, now needing its own code
    with pytest.raises(ValueError, match=rf"`model_name_or_path='{re.escape(str(adapter))}'` needs Python code"):
        load_model(adapter)
    assert not marker.exists()


@pytest.mark.slow
def test_parablock_fit_refuses_such_a_checkpoint_in_one_line_before_anything_is_written(tmp_path, capsys):
    marker = tmp_path / "its_code_ran"
    folder = save_custom_code_checkpoint(tmp_path / "custom", marker)
    args = recipe_args(tmp_path, folder)
    before = snapshot(tmp_path)
    err = refused(capsys, args)
    assert len(err.strip().splitlines()) == 1 and "never runs a checkpoint's code" in err, err
    assert not marker.exists()
    assert_nothing_created(tmp_path, before)


# --- a checkpoint that is not there ------------------------------------------------------------------------------


@pytest.mark.parametrize("removed", ["model.safetensors", "config.json"])
def test_a_model_folder_without_weights_or_config_is_refused_at_construction(tmp_path, removed):
    folder = save_tiny_checkpoint(tmp_path / "incomplete")
    (folder / removed).unlink()
    missing = "weights" if removed == "model.safetensors" else "config.json"
    with pytest.raises(FileNotFoundError, match=rf"`model_name_or_path='.*incomplete'` is not a model .*{missing}"):
        CausalLMModule(model_name_or_path=str(folder))


@pytest.mark.slow
def test_parablock_fit_refuses_a_model_folder_without_weights_before_the_before_evaluation(tmp_path, capsys):
    folder = save_tiny_checkpoint(tmp_path / "no_weights")
    (folder / "model.safetensors").unlink()
    args = recipe_args(tmp_path, folder)
    before = snapshot(tmp_path)
    err = refused(capsys, args)
    assert len(err.strip().splitlines()) == 1 and "is not a model folder: it holds no weights" in err, err
    assert_nothing_created(tmp_path, before)


def test_a_folder_under_the_home_directory_is_loaded_from_there(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    save_tiny_checkpoint(tmp_path / "models" / "tiny")
    module = CausalLMModule(model_name_or_path="~/models/tiny")
    assert module.model_config.vocab_size == 128
    module.configure_model()
    assert len(load_tokenizer("~/models/tiny")) > 100
    assert module.hparams.model_name_or_path == "~/models/tiny"  # saved as the user wrote it


def test_an_uncached_hub_name_offline_is_refused_naming_the_model(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    name = "parablock-tests/never-cached"
    module = CausalLMModule(model_name_or_path=name)
    for load in (lambda: module.model_config, module.configure_model, lambda: load_tokenizer(name)):
        with pytest.raises(OSError) as refusal:
            load()
        message = str(refusal.value)
        assert "\n" not in message and f"='{name}'" in message and "HF_HUB_OFFLINE" in message, message


def test_a_revision_with_a_local_folder_is_refused_not_ignored(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "tiny", torch.float32)
    with pytest.raises(ValueError, match=r"`revision='v2'` picks a version of a Hub checkpoint, but .* is a local"):
        CausalLMModule(model_name_or_path=str(folder), revision="v2")
