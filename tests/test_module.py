import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_parablock.data import CHAR_VOCAB_SIZE, SyntheticArithmeticDataModule
from lightning_parablock.module import CausalLMModule


@pytest.fixture
def datamodule():
    return SyntheticArithmeticDataModule(num_examples=64, val_examples=16, batch_size=8, seed=0)


def _batch_loss(module: CausalLMModule, batch: dict[str, torch.Tensor]) -> float:
    module.eval()
    with torch.no_grad():
        return module(**batch).loss.item()


def test_tiny_config_fits_tokenizer(tiny_llama_config):
    assert tiny_llama_config["vocab_size"] >= CHAR_VOCAB_SIZE


def test_requires_exactly_one_model_source(tiny_llama_config):
    with pytest.raises(ValueError, match="exactly one.*model_name_or_path=None and config=None"):
        CausalLMModule()
    with pytest.raises(ValueError, match="exactly one"):
        CausalLMModule(model_name_or_path="some/model", config=tiny_llama_config)
    with pytest.raises(ValueError, match="model_type"):
        CausalLMModule(config={"hidden_size": 32})


def test_seed_makes_init_reproducible(tiny_llama_config):
    rng_state = torch.get_rng_state()
    first = CausalLMModule(config=tiny_llama_config, seed=1).model.state_dict()
    assert torch.equal(torch.get_rng_state(), rng_state)
    second = CausalLMModule(config=tiny_llama_config, seed=1).model.state_dict()
    other = CausalLMModule(config=tiny_llama_config, seed=2).model.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_training_step_returns_loss(tiny_llama_config, datamodule):
    module = CausalLMModule(config=tiny_llama_config)
    batch = next(iter(datamodule.train_dataloader()))
    loss = module.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad


def test_trainer_fit_decreases_loss_on_fixed_batch(tiny_llama_config, datamodule):
    module = CausalLMModule(config=tiny_llama_config, learning_rate=1e-2)
    batch = next(iter(datamodule.train_dataloader()))
    before = _batch_loss(module, batch)
    trainer = L.Trainer(
        max_steps=30,
        limit_train_batches=1,  # the unshuffled loader then yields the same first batch every epoch
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    after = _batch_loss(module, batch)
    assert trainer.global_step == 30
    assert after < 0.7 * before
    assert {"train/loss", "val/loss"} <= set(trainer.callback_metrics)


def test_configure_optimizers_is_fresh_and_follows_requires_grad(tiny_llama_config):
    module = CausalLMModule(config=tiny_llama_config, learning_rate=3e-3, weight_decay=0.1, betas=(0.8, 0.9))
    module.configure_model()
    first, second = module.configure_optimizers(), module.configure_optimizers()
    assert first is not second
    assert isinstance(first, torch.optim.AdamW)
    group = first.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (3e-3, 0.1, (0.8, 0.9))
    assert sum(len(g["params"]) for g in first.param_groups) == len(list(module.parameters()))

    module.requires_grad_(False)
    active = list(module.hf_model.model.layers[1].parameters())
    for param in active:
        param.requires_grad_(True)
    optimized = [param for g in module.configure_optimizers().param_groups for param in g["params"]]
    assert {id(param) for param in optimized} == {id(param) for param in active}


def test_configure_optimizers_without_trainable_params_raises(tiny_llama_config):
    module = CausalLMModule(config=tiny_llama_config)
    module.requires_grad_(False)
    with pytest.raises(RuntimeError, match="requires_grad=True"):
        module.configure_optimizers()


def test_save_pretrained_roundtrip(tiny_llama_config, datamodule, tmp_path):
    module = CausalLMModule(config=tiny_llama_config)
    module.save_pretrained(tmp_path, tokenizer=datamodule.tokenizer)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    expected = module.hf_model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())
    assert AutoTokenizer.from_pretrained(tmp_path).get_vocab() == datamodule.tokenizer.get_vocab()

    reloaded = CausalLMModule(model_name_or_path=str(tmp_path))
    batch = next(iter(datamodule.train_dataloader()))
    assert _batch_loss(reloaded, batch) == pytest.approx(_batch_loss(module, batch))


@pytest.mark.parametrize("active_layer", [0, 1])
def test_gradient_checkpointing_gives_the_active_block_the_same_gradients(tiny_llama_config, datamodule, active_layer):
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    grads = []
    for checkpointing in (False, True):
        module = CausalLMModule(config=tiny_llama_config, seed=0, gradient_checkpointing=checkpointing)
        module.train()
        for name, param in module.named_parameters():  # as the strategy freezes: only one decoder layer trains
            param.requires_grad_(f"layers.{active_layer}." in name)
        recomputed = []
        if checkpointing:
            mlp = module.model.model.layers[active_layer].mlp  # called inside the checkpointed layer's forward
            mlp_forward = mlp.forward  # (module hooks do not run again in the recomputation; forward does)
            mlp.forward = lambda *args, **kwargs: recomputed.append(1) or mlp_forward(*args, **kwargs)
        module(**batch).loss.backward()
        if checkpointing:
            assert len(recomputed) == 2  # forward, then again in backward
        grads.append({n: p.grad for n, p in module.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and plain
    assert all(checkpointed[n] is not None and torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(learning_rate=float("nan")), r"`learning_rate` must be a finite number, got nan"),
        (dict(learning_rate=float("inf")), r"`learning_rate` must be a finite number, got inf"),
        (dict(learning_rate=-1e-3), r"`learning_rate` must be >= 0, got -0.001"),
        (dict(learning_rate="fast"), r"`learning_rate` must be a number, got 'fast' \(str\)"),
        (dict(weight_decay=float("inf")), r"`weight_decay` must be a finite number, got inf"),
        (dict(betas=(1.5, 0.9)), r"`betas\[0\]` must be in \[0, 1\), got 1.5"),
        (dict(betas=(0.9,)), r"`betas` must be two numbers in \[0, 1\).*got \(0.9,\)"),
        (dict(seed=2.5), r"`seed` must be an integer, got 2.5"),
        (dict(lora="yes"), r"`lora` must be a dict of `peft.LoraConfig` arguments.*got 'yes'"),
        (dict(gradient_checkpointing="no"), r"`gradient_checkpointing` must be True or False, got 'no' \(str\)"),
        (dict(config="llama"), r"`config` must be a dict.*got 'llama'"),
        (dict(lora={"r": 2.5}), r"`lora\['r'\]` must be an integer, got 2.5"),
        (dict(lora={"r": 0}), r"`lora\['r'\]` must be a positive integer, got 0"),
        (dict(lora={"r": "8"}), r"`lora\['r'\]` must be an integer, got '8' \(str\)"),
        (dict(lora={"lora_alpha": "big"}), r"`lora\['lora_alpha'\]` must be a number, got 'big'"),
        (dict(lora={"lora_alpha": -16}), r"`lora\['lora_alpha'\]` must be >= 0, got -16"),
        (dict(lora={"lora_dropout": 1.0}), r"`lora\['lora_dropout'\]` must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_arguments_are_refused_on_construction(tiny_llama_config, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        CausalLMModule(**{"config": tiny_llama_config, **kwargs})


@pytest.mark.parametrize("path", ["/nonexistent/path", "./missing_model", "~/missing_model"])
def test_a_missing_local_checkpoint_folder_is_named_not_read_as_a_hub_name(path):
    with pytest.raises(FileNotFoundError, match=rf"`model_name_or_path='{path}'` does not exist.*save_pretrained"):
        CausalLMModule(model_name_or_path=path)


def test_a_whole_float_lora_rank_is_taken_as_an_integer(tiny_llama_config):
    module = CausalLMModule(config=tiny_llama_config, lora={"r": 2.0})  # YAML and JSON may not keep 2 apart from 2.0
    assert module.model.peft_config["default"].r == 2


def test_optimizer_settings_from_a_checkpoint_list_are_accepted(tiny_llama_config):
    module = CausalLMModule(config=tiny_llama_config, learning_rate=0, betas=[0.8, 0.9], seed=1.0)  # hparams.yaml
    assert tuple(module.hparams.betas) == (0.8, 0.9)


def test_loading_options_reach_from_pretrained_and_the_model_loads_lazily(tmp_path):
    from pretrained import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "bf16", torch.bfloat16)
    module = CausalLMModule(model_name_or_path=str(folder), attn_implementation="eager")
    assert "model" not in module._modules and module.model_config.vocab_size == 128  # config read, no weights
    assert module.model.dtype == torch.bfloat16  # outside a Trainer "auto" keeps the checkpoint's dtype
    assert module.model.config._attn_implementation == "eager"
    module.configure_model()  # Lightning's call after a notebook built it: nothing happens
    assert module.model.dtype == torch.bfloat16
    assert CausalLMModule(model_name_or_path=str(folder), dtype="float32").model.dtype == torch.float32


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"dtype": "fp16"}, ValueError, r"`dtype` must be 'auto', 'bfloat16', 'float16' or 'float32', got 'fp16'"),
        ({"attn_implementation": "flash"}, ValueError, r"`attn_implementation` must be .*'sdpa'.*, got 'flash'"),
        ({"attn_implementation": "flash_attention_2"}, ImportError, r"pip install flash-attn.*'sdpa'"),
        ({"revision": "main"}, ValueError, r"`revision='main'` names a version of a checkpoint"),
    ],
)
def test_unknown_dtype_attention_or_revision_is_refused_before_loading(tiny_llama_config, options, error, message):
    with pytest.raises(error, match=message):
        CausalLMModule(config=tiny_llama_config, **options)


def test_flash_attention_without_cuda_names_sdpa(tiny_llama_config, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"runs on CUDA GPUs only.*attn_implementation='sdpa'"):
        CausalLMModule(config=tiny_llama_config, attn_implementation="flash_attention_2")


@pytest.mark.parametrize("training", [True, False])
def test_a_model_built_on_first_use_follows_the_modules_train_flag(tiny_llama_config, training):
    module = CausalLMModule(config={**tiny_llama_config, "attention_dropout": 0.5}).train(training)
    assert {m.training for m in module.model.modules()} == {training}  # no dropout after `module.eval()`
