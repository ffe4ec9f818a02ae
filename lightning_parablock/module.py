"""A LightningModule around any Hugging Face causal LM, ready for block-wise federated fine-tuning."""

import copy
import importlib.util
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from lightning_parablock._compat import attached_trainer
from lightning_parablock.argument_checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_optional_text,
)
from lightning_parablock.core.checkpoint_files import CheckpointTensors
from lightning_parablock.core.lora import add_lora, changed_base_weight, check_lora_options
from lightning_parablock.core.precision import lowers_precision, weight_dtype
from lightning_parablock.data.packing import (
    PackedAttention,
    choose_packed_attention,
    is_packed_batch,
    with_packed_attention,
)
from lightning_parablock.eval.perplexity import TokenPerplexity
from lightning_parablock.pretrained import load_pretrained, pretrained_location

DTYPES = ("auto", "bfloat16", "float16", "float32")
PRETRAINED_LEARNING_RATE = 2e-5
FROM_SCRATCH_LEARNING_RATE = 1e-3
ATTN_IMPLEMENTATIONS = (None, "sdpa", "eager", "flash_attention_2")


class AdapterMismatch(ValueError):
    """The LoRA adapter alone would not be the model (``reason``): :meth:`CausalLMModule.save_adapter` refuses."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"Cannot save the LoRA adapter alone: {reason}. Save the merged model with `save_pretrained`.")
        self.reason = reason


class CausalLMModule(L.LightningModule):
    """Train a causal LM on batches of ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` where no loss).

    The model is built (or loaded) in :meth:`configure_model`, which Lightning calls inside the strategy's device
    and dtype context before the strategy's setup: with ``devices=8`` no rank first builds a whole copy on the
    host. Outside a Trainer (a notebook), reading :attr:`model` builds it. Its parameters are registered under
    ``model.``, e.g. ``model.model.layers.0.mlp.up_proj.weight`` for Llama.

    Args:
        model_name_or_path: Checkpoint for ``AutoModelForCausalLM.from_pretrained`` (hub name or local folder).
        config: Keyword arguments for ``AutoConfig.for_model``, including ``model_type``, to train from scratch.
            Exactly one of ``model_name_or_path`` and ``config`` must be given.
        learning_rate: AdamW learning rate. ``None`` (the default): ``2e-5`` for a pretrained checkpoint (TRL's
            SFT default; higher rates undo what pretraining learned), ``1e-3`` for a model trained from ``config``.
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
        dtype: The dtype the weights are loaded in, straight from the checkpoint (no fp32 copy on the way):
            ``"auto"`` takes the one the Trainer's precision trains (fp32 for ``32-true`` and ``*-mixed``, bf16 for
            ``bf16-true``, fp16 for ``16-true``), or the checkpoint's own outside a Trainer; else ``"bfloat16"``,
            ``"float16"`` or ``"float32"``.
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"`` (needs CUDA and ``flash-attn``);
            ``None`` lets transformers choose.
        revision: The checkpoint's branch, tag or commit on the Hub (refused with a local folder, which has one).
            Remote code is never run: a checkpoint that needs its own code is refused by name
            (:mod:`~lightning_parablock.pretrained`).
    """

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        config: Optional[dict[str, Any]] = None,
        learning_rate: Optional[float] = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        seed: int = 0,
        lora: Optional[dict[str, Any]] = None,
        gradient_checkpointing: bool = False,
        dtype: str = "auto",
        attn_implementation: Optional[str] = None,
        revision: Optional[str] = None,
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
        if learning_rate is not None:
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
        check_bool("gradient_checkpointing", gradient_checkpointing)
        check_choice("dtype", dtype, DTYPES)
        check_attn_implementation(attn_implementation)
        check_optional_text("revision", revision, "a branch, tag or commit of the checkpoint")
        if revision is not None and model_name_or_path is None:
            raise ValueError(f"`revision={revision!r}` names a version of a checkpoint; pass `model_name_or_path` too.")
        if model_name_or_path is not None:
            pretrained_location("model_name_or_path", model_name_or_path, revision, weights=True)
        self.save_hyperparameters()
        self.val_perplexity = TokenPerplexity()  # token-weighted, summed across batches and processes
        self.packed_attention: Optional[PackedAttention] = None
        """How this model keeps packed examples apart, measured on the first packed batch (or at fit start when
        the datamodule packs): see :func:`~lightning_parablock.data.packing.choose_packed_attention`."""
        self.built_for_precision: Optional[str] = None
        """The Trainer precision the model was built for (its dtype with ``dtype="auto"``); ``None`` until it is
        built, or when it was built outside a Trainer (in the checkpoint's own dtype)."""

    def configure_model(self) -> None:
        """Build or load the model once; later calls do nothing.

        Lightning calls this in ``fit``/``validate``/``test`` inside the strategy's device and dtype context, so
        the weights land on the rank's device in the dtype the precision trains.
        """
        if "model" in self._modules:
            return
        hparams = self.hparams
        options = self._load_options()
        self.built_for_precision = self._trainer_precision()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hparams.seed)
            if hparams.model_name_or_path is not None:
                model = load_pretrained(
                    AutoModelForCausalLM.from_pretrained, "model_name_or_path", hparams.model_name_or_path,
                    hparams.revision, weights=True, **options,
                )  # fmt: skip
            else:
                if options.get("dtype") == "auto":  # a config has no checkpoint dtype to take
                    options.pop("dtype")
                model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hparams.config), **options)
            if hparams.gradient_checkpointing:
                _enable_gradient_checkpointing(model)
            if hparams.lora is not None:
                model = add_lora(model, hparams.lora)
        self.model = model.train(self.training)  # built on first use after `module.eval()`, it must not drop out

    def setup(self, stage: str) -> None:
        """Before fit: refuse a model built earlier in a dtype that this Trainer's precision would train in lower
        precision, naming where it was built (before the strategy's own, generic precision check)."""
        if stage == "fit":
            self._check_built_dtype()

    def _check_built_dtype(self) -> None:
        if "model" not in self._modules or self.hparams.dtype != "auto":
            return  # built by this fit in the dtype it trains, or in the dtype asked for (the strategy checks that)
        precision = self._trainer_precision()
        trained = (p.dtype for p in self.parameters() if p.requires_grad)
        low = next((dtype for dtype in trained if lowers_precision(dtype, precision)), None)
        if low is None:
            return
        had, wanted = (str(dtype).removeprefix("torch.") for dtype in (low, weight_dtype(precision)))
        built = self.built_for_precision
        where = (
            f"outside a Trainer (`module.model` read or `configure_model()` called before `trainer.fit`), in the"
            f" checkpoint's own dtype {had}"
            if built is None
            else f"for another Trainer's `precision={built!r}`, in {had}"
        )
        raise MisconfigurationException(
            f"The model of this CausalLMModule was built {where}; `precision={precision!r}` trains {wanted} weights,"
            f" so they would train in lower precision than asked. Build it after `Trainer(...)`: create a fresh"
            f" CausalLMModule and let `trainer.fit` build it in {wanted}, without reading `module.model` first; or"
            f" load it in {wanted} wherever it is built with `CausalLMModule(..., dtype={wanted!r})`."
        )

    def _load_options(self) -> dict[str, Any]:
        """``dtype`` and ``attn_implementation`` for ``from_pretrained``/``from_config``."""
        hparams = self.hparams
        options: dict[str, Any] = {"dtype": load_dtype(hparams.dtype, self._trainer_precision())}
        if hparams.attn_implementation is not None:
            options["attn_implementation"] = hparams.attn_implementation
        return options

    def _trainer_precision(self) -> Optional[str]:
        trainer = attached_trainer(self)
        return None if trainer is None else str(trainer.precision)

    @property
    def model(self) -> nn.Module:
        """The wrapped model, built by :meth:`configure_model` on first use outside a Trainer."""
        if "model" not in self._modules:
            self.configure_model()
        return self._modules["model"]

    @property
    def model_config(self) -> PretrainedConfig:
        """The model's Hugging Face config, read from the checkpoint without loading its weights when unbuilt."""
        if "model" in self._modules:
            return self._modules["model"].config
        hparams = self.hparams
        if hparams.model_name_or_path is not None:
            name = hparams.model_name_or_path
            return load_pretrained(AutoConfig.from_pretrained, "model_name_or_path", name, hparams.revision)
        return AutoConfig.for_model(**hparams.config)

    @property
    def hf_model(self) -> PreTrainedModel:
        """The wrapped Hugging Face model."""
        return self.model

    def forward(self, **batch: torch.Tensor) -> Any:
        """The Hugging Face model's output; ``.loss`` is set when ``labels`` are passed.

        A packed batch (``position_ids``, no ``attention_mask``) gets what this model needs to keep its examples
        apart; the first one decides what that is, or refuses packing (:meth:`check_packing`), so the module
        packs correctly in a notebook too. Without a KV cache: scoring whole sequences needs none, and with one
        transformers ignores the restarting ``position_ids`` of packed rows.
        """
        if is_packed_batch(batch):
            if self.packed_attention is None:
                self.check_packing()
            batch = with_packed_attention(batch, self.packed_attention, self._mask_dtype())
        return self.model(**{"use_cache": False, **batch})

    def check_packing(self) -> PackedAttention:
        """Measure how this model keeps packed examples apart and remember it; ``ValueError`` naming the model and
        ``packing=False`` where nothing does. Runs inside the Trainer's precision context when attached, so the
        check sees the dtypes training computes in."""
        trainer = attached_trainer(self)
        context = nullcontext() if trainer is None else trainer.precision_plugin.forward_context()
        with context:
            self.packed_attention = choose_packed_attention(self.model, self._mask_dtype())
        return self.packed_attention

    def on_fit_start(self) -> None:
        """Refuse packing on a model that cannot keep examples apart before the first step, not at it."""
        if getattr(self.trainer.datamodule, "packing", False):
            self.check_packing()

    def _mask_dtype(self) -> torch.dtype:
        """The 4D mask's dtype: the input embeddings', which the attention scores start from."""
        return self.model.get_input_embeddings().weight.dtype

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
            params, lr=self.learning_rate, weight_decay=hparams.weight_decay, betas=tuple(hparams.betas)
        )

    @property
    def learning_rate(self) -> float:
        """The AdamW rate: as given, else the default for a pretrained checkpoint or a model from ``config``."""
        given = self.hparams.learning_rate
        if given is not None:
            return given
        return PRETRAINED_LEARNING_RATE if self.hparams.model_name_or_path is not None else FROM_SCRATCH_LEARNING_RATE

    def save_pretrained(self, path: Union[str, Path], tokenizer: Optional[PreTrainedTokenizerBase] = None) -> None:
        """Write the model (and ``tokenizer``, if given) in Hugging Face format, loadable with ``from_pretrained``.

        LoRA adapters are merged into a copy of the base weights first, so the folder is a plain model.
        """
        model = copy.deepcopy(self.model).merge_and_unload() if self.hparams.lora is not None else self.model
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    def save_adapter(self, path: Union[str, Path]) -> None:
        """Write the LoRA adapter alone, in peft's format (``adapter_config.json``, ``adapter_model.safetensors``):
        ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), path)`` is this model.

        Refused (``ValueError``, nothing written) where it would not be, see :meth:`adapter_mismatch`: after FLoRA,
        which merges the aggregated adapters into the base weights every round, save the merged model
        (:meth:`save_pretrained`) instead.
        """
        reason = self.adapter_mismatch()
        if reason is not None:
            raise AdapterMismatch(reason)
        self.model.save_pretrained(path)

    def adapter_mismatch(self) -> Optional[str]:
        """Why the LoRA adapter alone, applied to the checkpoint the model was loaded from, would not be this model;
        ``None`` when it would be: every base weight is still the checkpoint's (compared tensor by tensor from its
        safetensors files, in the model's dtype)."""
        hparams = self.hparams
        if hparams.lora is None:
            return "the model has no LoRA adapters (`lora=None`)"
        if hparams.model_name_or_path is None:
            return "the model was built from `config`, so there is no checkpoint for the adapter to apply to"
        try:
            reference = CheckpointTensors(hparams.model_name_or_path, hparams.revision)
        except (OSError, ValueError) as error:
            return f"its checkpoint {hparams.model_name_or_path!r} cannot be read to check against ({error})"
        changed = changed_base_weight(self.model, reference.get)
        if changed is not None:
            return (
                f"the base weights are no longer the checkpoint's ({changed} differs; FLoRA merges the aggregated"
                " adapters into them every round)"
            )
        return None


def load_dtype(dtype: str, precision: Optional[str]) -> Union[str, torch.dtype]:
    """The dtype to load weights in: the one asked for, else the one ``precision`` trains, else the checkpoint's."""
    if dtype != "auto":
        return getattr(torch, dtype)
    return weight_dtype(precision) or "auto"


def check_attn_implementation(attn_implementation: Optional[str]) -> None:
    """Refuse an unknown attention implementation, and flash-attention where it cannot run, before loading."""
    check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    if attn_implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "`attn_implementation='flash_attention_2'` needs the flash-attn package: `pip install flash-attn"
            " --no-build-isolation` on a CUDA machine, or use `attn_implementation='sdpa'`."
        )
    if not torch.cuda.is_available():
        raise ValueError(
            "`attn_implementation='flash_attention_2'` runs on CUDA GPUs only and none is available; use"
            " `attn_implementation='sdpa'` (or 'eager')."
        )


def _enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant, so layers below the active block, whose inputs need no gradient, still pass one to it."""
    if not model.supports_gradient_checkpointing:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing.")
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 names it so
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a cache is useless in training and conflicts with recomputation
