"""Refuse, at setup, weights that would train in lower precision than the Trainer's precision asks for.

``32-true`` and the ``*-mixed`` precisions promise fp32 weights; Lightning casts nothing for them, so a model
loaded in bf16 (a Hub checkpoint's own dtype) would train bf16 weights under ``precision="bf16-mixed"``, and
every aggregate would be rounded to bf16. ``CausalLMModule(dtype="auto")`` loads such a checkpoint in fp32
under these precisions; anything else that reaches the strategy in half precision is refused here, by name.
"""

from __future__ import annotations

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_parablock.core.precision import lowers_precision, weight_dtype


def check_precision(module: nn.Module, precision: str) -> None:
    """Every trainable weight of ``module`` must hold at least the precision ``precision`` trains in."""
    low = [(name, p.dtype) for name, p in module.named_parameters() if p.requires_grad and lowers_precision(p.dtype, precision)]
    if not low:
        return
    name, dtype = low[0]
    wanted = str(weight_dtype(precision)).removeprefix("torch.")
    half = str(dtype).removeprefix("torch.")
    raise MisconfigurationException(
        f"`precision={precision!r}` trains {wanted} weights, but {len(low)} trainable parameter(s) are {half}"
        f" (e.g. {name}): they would train in lower precision than asked. Load the model in {wanted}"
        f" (`CausalLMModule(dtype='auto')` or `dtype='{wanted}'`, or `model.float()`), or ask for half-precision"
        f" weights trained through fp32 masters with `precision='{'bf16' if dtype.__repr__().endswith('bfloat16') else '16'}-true'`."
    )
