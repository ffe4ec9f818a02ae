"""LoRA adapters (via ``peft``) and the two things federated LoRA methods do to them: merge and restart.

FLoRA merges the aggregated product Σ w_i B_i A_i into the frozen base weights and starts
every client from fresh adapters; FedIT and FFA-LoRA only train and average the adapters.
Nothing here knows about rounds or Lightning. ``peft`` (which brings transformers) is imported by the
functions that build or find adapters, not with this module: the aggregators and ``core`` need only the names.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_parablock.argument_checks import check_float, check_int

if TYPE_CHECKING:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

LORA_DEFAULTS: dict[str, Any] = {"r": 32, "lora_alpha": 64, "lora_dropout": 0.05, "target_modules": "all-linear"}
ADAPTER = "default"
LORA_A_WEIGHT, LORA_B_WEIGHT = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"  # name suffixes


def check_lora_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``r`` a positive integer, ``lora_alpha`` a number >= 0 and ``lora_dropout`` in [0, 1).

    Checked by name before any model is built: peft takes ``r=2.5`` and torch then fails deep inside a layer.
    A key that is no ``peft.LoraConfig`` argument is refused too. Returns the options with ``r`` as an ``int``
    (``2.0`` is 2).
    """
    from peft import LoraConfig

    unknown = set(options) - set(LoraConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"Unknown LoRA options {sorted(unknown)}; use `peft.LoraConfig` arguments such as r, lora_alpha."
        )
    if "lora_alpha" in options:
        check_float("lora['lora_alpha']", options["lora_alpha"], minimum=0.0)
    if "lora_dropout" in options:
        check_float("lora['lora_dropout']", options["lora_dropout"], minimum=0.0, maximum=1.0, max_open=True)
    if "r" in options:
        return {**options, "r": check_int("lora['r']", options["r"], minimum=1)}
    return dict(options)


def add_lora(model: nn.Module, options: dict[str, Any]) -> "PeftModel":
    """``model`` with LoRA adapters on ``options`` (``LoraConfig`` arguments over :data:`LORA_DEFAULTS`).

    The base weights are frozen; B starts at zero, so the wrapped model computes what ``model`` did.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**{**LORA_DEFAULTS, **check_lora_options(options)})
    with warnings.catch_warnings():  # peft asks transformers 5 for a renamed property; not the user's to act on
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


@dataclass(frozen=True)
class LoraPair:
    """One adapted linear layer: the qualified names of its base weight and of its A and B."""

    layer: "LoraLayer"
    base: str
    a: str
    b: str

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[ADAPTER])


def lora_pairs(model: nn.Module) -> Iterator[LoraPair]:
    """Every LoRA-adapted layer of ``model`` with the parameter names ``model.named_parameters()`` uses."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            prefix = f"{name}." if name else ""
            yield LoraPair(
                module,
                base=f"{prefix}base_layer.weight",
                a=f"{prefix}lora_A.{ADAPTER}.weight",
                b=f"{prefix}lora_B.{ADAPTER}.weight",
            )


@torch.no_grad()
def merge_products(model: nn.Module, products: dict[str, Tensor]) -> None:
    """W += scaling · P for every adapted layer whose base weight name is in ``products`` (P = Σ w_i B_i A_i)."""
    params = dict(model.named_parameters())
    for pair in lora_pairs(model):
        if pair.base in products:
            weight = params[pair.base]
            update = pair.scaling * products[pair.base].to(weight.device, torch.float32)
            weight.copy_((weight.float() + update).to(weight.dtype))


@torch.no_grad()
def restart_adapters(model: nn.Module, generator: torch.Generator) -> None:
    """Fresh adapters everywhere: A drawn like peft's default (Kaiming uniform) from a generator seeded by
    ``generator`` (seeded by the round), so every client draws the same A; B zero, so the model's output does not change."""
    for pair in lora_pairs(model):
        a, b = pair.layer.lora_A[ADAPTER].weight, pair.layer.lora_B[ADAPTER].weight
        bound = 1.0 / a.shape[1] ** 0.5  # kaiming_uniform_ with a=sqrt(5): sqrt(6 / ((1 + 5) fan_in))
        a.copy_((torch.rand(a.shape, generator=generator) * 2 - 1).mul_(bound).to(a.device, a.dtype))
        b.zero_()


ADAPTER_NAME_PART = ".lora_"
"""In every adapter parameter's name (``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_magnitude_vector``)."""


@torch.no_grad()
def changed_base_weight(model: PeftModel, reference: Callable[[str], Optional[Tensor]]) -> Optional[str]:
    """The first base weight of ``model`` that is not the ``reference`` checkpoint's (its checkpoint name, with
    ``(not in the checkpoint)`` when there is none to compare), or ``None`` when every one is, in the model's dtype.

    ``reference`` gives a checkpoint tensor by its name, which is the base parameter's name without peft's
    ``.base_layer``. Only then is the adapter alone, applied to that checkpoint, this model.
    """
    for name, param in model.get_base_model().named_parameters():
        if ADAPTER_NAME_PART in name:
            continue
        key = name.replace(".base_layer.", ".")
        saved = reference(key)
        if saved is None:
            return f"{key} (not in the checkpoint)"
        if saved.shape != param.shape or not torch.equal(saved.to(param.device, param.dtype), param):
            return key
    return None
