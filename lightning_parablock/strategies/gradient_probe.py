"""The gradient-guided schedule's probe: one full backward, the gradient norm of every block.

The probe runs at a round's start on the global model, before any client's view is loaded,
with the round's first batch (its first participant's). It leaves no trace in the model:
``requires_grad`` flags come back as they were and no ``.grad`` is written (``autograd.grad``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable

import torch
from torch import Tensor, nn


def block_gradient_norms(loss_fn: Callable[[], Tensor], blocks: Sequence[Sequence[nn.Parameter]]) -> list[float]:
    """The L2 norm of d loss / d block for every block, from one backward pass.

    Parameters of every block are made trainable for the pass; a block none of whose
    parameters reach the loss has norm 0.
    """
    params = [p for block in blocks for p in block]
    flags = [p.requires_grad for p in params]
    try:
        for param in params:
            param.requires_grad_(True)
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    finally:
        for param, flag in zip(params, flags):
            param.requires_grad_(flag)
    norms, position = [], 0
    for block in blocks:
        squares = [g.float().pow(2).sum() for g in grads[position : position + len(block)] if g is not None]
        norms.append(float(torch.stack(squares).sum().sqrt()) if squares else 0.0)
        position += len(block)
    return norms


@contextmanager
def _logging_muted(module: nn.Module) -> Iterator[None]:
    """``training_step`` logs its loss; the probe's loss is no training loss."""
    module.log = module.log_dict = lambda *args, **kwargs: None  # instance attributes shadow the methods
    try:
        yield
    finally:
        del module.log, module.log_dict


class GradientProbe:
    """``block_gradient_norms`` for :class:`~lightning_parablock.core.schedule.BlockSchedule`.

    The loss is the module's own ``training_step`` on the round's first batch (its logging muted), so any
    module can be probed.

    Args:
        module: the LightningModule whose ``training_step`` gives the loss.
        blocks: the trainable parameters of every block, in block order.
        batch_of_round: the batch to probe a round with, on the training device (the same on every rank).
        step_context: the precision plugin's context of a training step (autocast).
    """

    def __init__(
        self,
        module: nn.Module,
        blocks: Sequence[Sequence[nn.Parameter]],
        batch_of_round: Callable[[int], Any],
        step_context: Callable[[], AbstractContextManager],
    ) -> None:
        self.module = module
        self.blocks = blocks
        self.batch_of_round = batch_of_round
        self.step_context = step_context

    def __call__(self, round_index: int) -> list[float]:
        batch = self.batch_of_round(round_index)

        def loss() -> Tensor:
            with _logging_muted(self.module), self.step_context():
                output: Any = self.module.training_step(batch, 0)
            return output["loss"] if isinstance(output, dict) else output

        return block_gradient_norms(loss, self.blocks)
