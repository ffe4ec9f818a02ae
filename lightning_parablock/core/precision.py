"""Which dtype the weights must have for each Trainer precision: one table, read by the module and the strategy.

``32-true`` and the ``*-mixed`` precisions keep fp32 weights (mixed runs the forward under autocast); the
``*-true`` half precisions keep half-precision weights and train the active block through fp32 masters. A
checkpoint in another dtype is loaded straight into the dtype its precision needs, so a bf16 Hub checkpoint
under ``bf16-mixed`` trains fp32 weights as asked, and never bf16 ones.
"""

from __future__ import annotations

from typing import Optional

import torch

WEIGHT_DTYPES: dict[str, torch.dtype] = {
    "32-true": torch.float32,
    "32": torch.float32,
    "bf16-mixed": torch.float32,
    "16-mixed": torch.float32,
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
}
"""Trainer precision -> the dtype of the model's weights while it trains."""


def weight_dtype(precision: Optional[str]) -> Optional[torch.dtype]:
    """The weights' dtype under ``precision`` (a Trainer's precision string); ``None`` when unknown or unset."""
    return WEIGHT_DTYPES.get(str(precision)) if precision is not None else None


def lowers_precision(param_dtype: torch.dtype, precision: Optional[str]) -> bool:
    """True when a weight of ``param_dtype`` would train below what ``precision`` asks (bf16 under ``32-true``)."""
    wanted = weight_dtype(precision)
    if wanted is None or not param_dtype.is_floating_point:
        return False
    return torch.finfo(param_dtype).bits < torch.finfo(wanted).bits
