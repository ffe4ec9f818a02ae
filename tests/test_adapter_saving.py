"""A LoRA method's adapter alone, in peft's format, beside the merged model: loaded onto the checkpoint with
``PeftModel.from_pretrained`` it computes what the merged model computes. Where it would not (FLoRA merges the
aggregated adapters into the base weights every round) it is refused, and nothing is written."""

import json
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from peft import PeftModel
from pretrained import save_tiny_checkpoint
from test_finetune_recipe import recipe_args
from transformers import AutoModelForCausalLM

from lightning_parablock import CausalLMModule, ParaBlockCallback, method
from lightning_parablock.cli import main
from lightning_parablock.data import SyntheticArithmeticDataModule

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
PRECISIONS = {torch.float32: ("32-true", 1e-5), torch.bfloat16: ("bf16-true", 1e-2)}  # bf16: merging rounds


def fine_tuned(name: str, checkpoint: Path, dtype: torch.dtype) -> CausalLMModule:
    spec = method(name)
    module = CausalLMModule(model_name_or_path=str(checkpoint), learning_rate=1e-2, **spec.module_args(LORA))
    trainer = quiet_trainer(strategy=spec.strategy(num_clients=2, local_steps=2), callbacks=[ParaBlockCallback.for_method(spec)],
                            max_epochs=2, precision=PRECISIONS[dtype][0])  # fmt: skip
    trainer.fit(module, SyntheticArithmeticDataModule(num_examples=32, val_examples=8, batch_size=4, max_length=48))
    return module


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["fedit", "ffa_lora"])
def test_the_adapter_alone_on_the_checkpoint_is_the_merged_model(name, dtype, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint", dtype)
    module = fine_tuned(name, checkpoint, dtype)
    module.save_adapter(tmp_path / "adapter")
    module.save_pretrained(tmp_path / "merged")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(checkpoint) and config["r"] == LORA["r"]

    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    before = logits(base, ids)
    adapted = logits(PeftModel.from_pretrained(base, tmp_path / "adapter"), ids)
    merged = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype), ids)
    tolerance = PRECISIONS[dtype][1]
    assert (adapted - before).abs().max() > 10 * tolerance  # the adapter carries what training learned
    torch.testing.assert_close(adapted, merged, atol=tolerance, rtol=tolerance)


def test_flora_refuses_the_adapter_alone_and_writes_nothing(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")
    module = fine_tuned("flora", checkpoint, torch.float32)
    with pytest.raises(ValueError, match=r"the base weights are no longer the checkpoint's \(model\.layers\.\d+\..*differs; FLoRA merges"):
        module.save_adapter(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_an_adapter_without_a_checkpoint_to_apply_to_is_refused(tiny_llama_config, tmp_path):
    module = CausalLMModule(config=tiny_llama_config, lora=LORA)
    with pytest.raises(ValueError, match="built from `config`, so there is no checkpoint for the adapter to apply to"):
        module.save_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"no LoRA adapters \(`lora=None`\)"):
        CausalLMModule(config=tiny_llama_config).save_adapter(tmp_path / "adapter")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedit", "flora"])
def test_the_cli_writes_the_adapter_beside_the_merged_model_where_it_is_the_model(name, tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny_chat")
    output = tmp_path / "final_model"
    main(recipe_args(tmp_path, checkpoint, "--output_dir", str(output), "--method", name))
    summary = capsys.readouterr().out
    if name == "flora":
        assert not (output / "adapter").exists() and "no adapter-only copy: the base weights are no longer" in summary
        return
    assert "the LoRA adapter alone in adapter/" in summary
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    adapted = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), output / "adapter"), ids)
    torch.testing.assert_close(adapted, logits(AutoModelForCausalLM.from_pretrained(output), ids), atol=1e-5, rtol=1e-5)
