"""fp32 master copies of the active block when the model's weights are bf16 or fp16 (BAdam's recipe).

A half-precision weight cannot take a step smaller than half its spacing (2^-8 relative in bf16): an
AdamW step of 1e-5 on a weight of 1.0 rounds away and the block never moves. So for one client's turn
the active block's half-precision parameters train through fp32 masters: the forward still reads the
half-precision weights, each gradient moves to its master as soon as backward has accumulated it (the
half-precision parameter never keeps one), the optimizer steps the masters (its state is fp32 and
exists for this block only), and a step hook writes the masters, rounded, into the model. Δ^i is then
read from the masters, in fp32, and no small step is lost within the turn.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

HALF_DTYPES = (torch.bfloat16, torch.float16)


def needs_master(param: Tensor) -> bool:
    """Half-precision weights train through an fp32 master; fp32 ones train in place."""
    return param.dtype in HALF_DTYPES


def rebind(optimizer: Optimizer, mapping: Mapping[Tensor, Tensor]) -> None:
    """Make ``optimizer`` step ``mapping[p]`` instead of ``p``, carrying ``p``'s state over."""
    for group in optimizer.param_groups:
        group["params"] = [mapping.get(p, p) for p in group["params"]]
    for old, new in mapping.items():
        if old in optimizer.state:
            optimizer.state[new] = optimizer.state.pop(old)


class MasterBlock:
    """The fp32 masters of one turn's block, wired between the model and the client's optimizer.

    Args:
        params: the block's parameters that need a master (half precision), by name.
        start: the client's view of those parameters in fp32 (exact, not rounded to the weights' dtype).
        optimizer: the client's optimizer over the model's parameters; it steps the masters until
            :meth:`release`.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], start: Mapping[str, Tensor], optimizer: Optimizer) -> None:
        self.params = dict(params)
        self.optimizer = optimizer
        self.masters = {name: nn.Parameter(start[name].detach().clone()) for name in self.params}
        rebind(optimizer, {self.params[n]: self.masters[n] for n in self.params})
        self._hooks: list[RemovableHandle] = [
            self.params[name].register_post_accumulate_grad_hook(_grad_to(master))
            for name, master in self.masters.items()
        ]
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.write_back()))
        self.write_back()

    @torch.no_grad()
    def write_back(self) -> None:
        """The masters, rounded to the weights' dtype, become the model's weights for the next forward."""
        for name, master in self.masters.items():
            self.params[name].copy_(master)

    def release(self) -> None:
        """Unhook; the optimizer steps the model's parameters again and keeps its fp32 state for a next turn."""
        for hook in self._hooks:
            hook.remove()
        rebind(self.optimizer, {self.masters[n]: self.params[n] for n in self.params})
        for param in self.params.values():
            param.grad = None


def _grad_to(master: nn.Parameter):
    """Move a half-precision gradient into ``master.grad`` (accumulating in fp32) and drop it from the weight."""

    def hook(param: Tensor) -> None:
        if master.grad is None:
            master.grad = param.grad.to(master.dtype)
        else:
            master.grad.add_(param.grad)
        param.grad = None

    return hook
