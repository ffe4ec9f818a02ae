"""Buffers that must stay fp32 when a precision plugin casts the whole model to bf16 or fp16.

``precision="bf16-true"`` casts every floating tensor of the module, buffers included. Rotary position
embeddings (HF's ``inv_freq`` and ``original_inv_freq``) then lose all but 3 significant digits of their
frequencies, and the angles ``position × inv_freq`` drift by whole radians at long positions: the model's
attention is no longer the one it was trained with. HF's rotary forward computes in fp32 from an fp32 buffer
whatever the weights' dtype, so keeping the buffer fp32 is all it takes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

FP32_BUFFER_SUFFIXES = ("inv_freq",)
"""Buffers whose name ends in one of these keep their fp32 values through a cast of the module."""


@contextlib.contextmanager
def fp32_rotary_buffers(module: nn.Module) -> Iterator[None]:
    """Whatever the body does to ``module``'s dtype, its fp32 rotary buffers come out fp32 with their exact values."""
    kept = {
        name: buffer.detach().clone()
        for name, buffer in module.named_buffers(remove_duplicate=False)
        if name.endswith(FP32_BUFFER_SUFFIXES) and buffer.dtype == torch.float32
    }
    yield
    for name, original in kept.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        current = getattr(owner, attribute)
        if current.dtype != torch.float32:
            setattr(owner, attribute, original.to(current.device))  # stays a buffer, persistent or not
