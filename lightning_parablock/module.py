"""A LightningModule around any Hugging Face causal LM, ready for block-wise federated fine-tuning."""

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lightning_parablock.argument_checks import check_bool, check_float, check_int, check_pretrained_folder
from lightning_parablock.core.lora import add_lora, check_lora_options
from lightning_parablock.eval.perplexity import TokenPerplexity


class CausalLMModule(L.LightningModule):
    """Train a causal LM on batches of ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` where no loss).

    The model is built in ``__init__`` so a strategy can inspect and freeze its parameters before training.
    Its parameters are registered under ``model.``, e.g. ``model.model.layers.0.mlp.up_proj.weight`` for Llama.

    Args:
        model_name_or_path: Checkpoint for ``AutoModelForCausalLM.from_pretrained`` (hub name or local folder).
        config: Keyword arguments for ``AutoConfig.for_model``, including ``model_type``, to train from scratch.
            Exactly one of ``model_name_or_path`` and ``config`` must be given.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        seed: Seeds the random initialization of a model built from ``config`` and of LoRA adapters, without
            touching global RNG state: every client starts from the same adapters.
        lora: Add LoRA adapters with ``peft`` and freeze the base weights, e.g. ``{"r": 32}``; keys are
            ``LoraConfig`` arguments (defaults: ``r=32``, ``lora_alpha=64``, ``lora_dropout=0.05``,
            ``target_modules="all-linear"``). Adapter parameters are named ``...lora_A.default.weight`` and
            ``...lora_B.default.weight``.
        gradient_checkpointing: Recompute each decoder layer's activations in backward instead of keeping them
            (Hugging Face's ``gradient_checkpointing_enable``), trading compute for activation memory. Non-reentrant
            checkpointing, so layers below the active block, whose inputs need no gradient, still pass one to it.
    """

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        config: Optional[dict[str, Any]] = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        seed: int = 0,
        lora: Optional[dict[str, Any]] = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if (model_name_or_path is None) == (config is None):
            raise ValueError(
                "Pass exactly one of `model_name_or_path` (a pretrained checkpoint) and `config` (a dict for"
                f" `AutoConfig.for_model`), got model_name_or_path={model_name_or_path!r} and config={config!r}."
            )
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"`config` must be a dict of `AutoConfig.for_model` arguments, got {config!r}.")
        if config is not None and "model_type" not in config:
            raise ValueError(f"`config` must name a `model_type` such as 'llama', got keys {sorted(config)}.")
        # Checked here, by name: torch's AdamW lets an infinite rate or weight decay through.
        check_float("learning_rate", learning_rate, minimum=0.0)
        check_float("weight_decay", weight_decay, minimum=0.0)
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ValueError(f"`betas` must be two numbers in [0, 1), e.g. (0.9, 0.999), got {betas!r}.")
        for index, beta in enumerate(betas):
            check_float(f"betas[{index}]", beta, minimum=0.0, maximum=1.0, max_open=True)
        check_int("seed", seed, minimum=0)
        if lora is not None and not isinstance(lora, Mapping):
            raise TypeError(f"`lora` must be a dict of `peft.LoraConfig` arguments such as {{'r': 32}}, got {lora!r}.")
        if lora is not None:
            check_lora_options(lora)
        if isinstance(model_name_or_path, str):
            check_pretrained_folder("model_name_or_path", model_name_or_path)
        check_bool("gradient_checkpointing", gradient_checkpointing)
        self.save_hyperparameters()
        self.val_perplexity = TokenPerplexity()  # token-weighted, summed across batches and processes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if model_name_or_path is not None:
                self.model = AutoModelForCausalLM.from_pretrained(model_name_or_path)
            else:
                self.model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
            if gradient_checkpointing:
                self._enable_gradient_checkpointing()
            if lora is not None:
                self.model = add_lora(self.model, lora)

    def _enable_gradient_checkpointing(self) -> None:
        """Non-reentrant, so layers below the active block, whose inputs need no gradient, still pass one to it."""
        if not self.model.supports_gradient_checkpointing:
            raise ValueError(f"{type(self.model).__name__} does not support gradient checkpointing.")
        enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5 names it so
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False  # a cache is useless in training and conflicts with recomputation

    @property
    def hf_model(self) -> PreTrainedModel:
        """The wrapped Hugging Face model."""
        return self.model

    def forward(self, **batch: torch.Tensor) -> Any:
        """The Hugging Face model's output; ``.loss`` is set when ``labels`` are passed."""
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        output = self(**batch)
        self.log("val/loss", output.loss, on_epoch=True, prog_bar=True, batch_size=batch["input_ids"].size(0))
        self.val_perplexity.update(output.logits, batch["labels"])
        self.log("val/perplexity", self.val_perplexity, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.AdamW:
        """A fresh AdamW over the parameters that require grad right now.

        The block-coordinate strategy freezes all but the active block and calls this per client and round,
        so optimizer state never leaks across blocks and frozen parameters carry no AdamW state.
        """
        params = [param for param in self.parameters() if param.requires_grad]
        if not params:
            raise RuntimeError(
                "`CausalLMModule.configure_optimizers` found no parameter with `requires_grad=True`;"
                " unfreeze at least one block before building the optimizer."
            )
        hparams = self.hparams
        return torch.optim.AdamW(
            params, lr=hparams.learning_rate, weight_decay=hparams.weight_decay, betas=tuple(hparams.betas)
        )

    def save_pretrained(self, path: Union[str, Path], tokenizer: Optional[PreTrainedTokenizerBase] = None) -> None:
        """Write the model (and ``tokenizer``, if given) in Hugging Face format, loadable with ``from_pretrained``.

        LoRA adapters are merged into a copy of the base weights first, so the folder is a plain model.
        """
        model = copy.deepcopy(self.model).merge_and_unload() if self.hparams.lora is not None else self.model
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
