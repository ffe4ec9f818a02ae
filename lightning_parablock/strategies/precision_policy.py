"""Refuse, at setup, weights that would train in lower precision than the Trainer's precision asks for.

``32-true`` and the ``*-mixed`` precisions promise fp32 weights; Lightning casts nothing for them, so a model
loaded in bf16 (a Hub checkpoint's own dtype) would train bf16 weights under ``precision="bf16-mixed"``, and
every aggregate would be rounded to bf16. ``CausalLMModule(dtype="auto")`` loads such a checkpoint in fp32
under these precisions; anything else that reaches the strategy in half precision is refused here, by name.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_parablock.core.precision import lowers_precision, weight_dtype

_TRUE_PRECISION = {torch.bfloat16: "bf16-true", torch.float16: "16-true"}


def check_precision(module: nn.Module, precision: str) -> None:
    """Every trainable weight of ``module`` must hold at least the precision ``precision`` trains in."""
    trainable = [(name, param.dtype) for name, param in module.named_parameters() if param.requires_grad]
    low = [(name, dtype) for name, dtype in trainable if lowers_precision(dtype, precision)]
    if not low:
        return
    name, dtype = low[0]
    wanted = str(weight_dtype(precision)).removeprefix("torch.")
    raise MisconfigurationException(
        f"`precision={precision!r}` trains {wanted} weights, but {len(low)} trainable parameter(s) are"
        f" {str(dtype).removeprefix('torch.')} (e.g. {name}): they would train in lower precision than asked. Load"
        f" the model in {wanted} (`CausalLMModule(dtype='auto')` or `dtype='{wanted}'`, or `model.float()`), or"
        f" train half-precision weights through fp32 masters with `precision='{_TRUE_PRECISION[dtype]}'`."
    )
