"""The gradient-guided schedule's probe: one full backward, the gradient norm of every block.

The probe runs at a round's start on the global model, before any client's view is loaded,
with the round's first batch (its first participant's). It leaves no trace in the model:
``requires_grad`` flags come back as they were and no ``.grad`` is written (``autograd.grad``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_parablock.strategies.federated_block import FederatedBlockStrategy


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
    """``block_gradient_norms`` for :class:`~lightning_parablock.core.schedule.BlockSchedule`, bound to a strategy.

    The loss is the LightningModule's own ``training_step`` on the round's first batch (its
    logging muted), so any module the strategy trains can be probed.
    """

    def __init__(self, strategy: "FederatedBlockStrategy") -> None:
        self.strategy = strategy

    def __call__(self, round_index: int) -> list[float]:
        strategy = self.strategy
        module, partition = strategy.lightning_module, strategy.partition
        trainable = strategy._user_trainable
        blocks = [
            [p for name, p in partition.parameters(module, b).items() if trainable is None or name in trainable]
            for b in range(len(partition))
        ]
        batch = self._probe_batch(round_index)

        def loss() -> Tensor:
            with _logging_muted(module), strategy.precision_plugin.train_step_context():
                output: Any = module.training_step(batch, 0)
            return output["loss"] if isinstance(output, dict) else output

        return block_gradient_norms(loss, blocks)

    def _probe_batch(self, round_index: int) -> Any:
        strategy = self.strategy
        loader = strategy.lightning_module.trainer.train_dataloader
        # The round's first participant on any rank: every rank probes the same batch and picks the same block.
        first_client = strategy.participants_of(round_index)[0]
        first_batch = strategy.batch_sampler.turn_batches(first_client, round_index)[0]
        batch = loader.collate_fn([loader.dataset[i] for i in first_batch])
        return strategy.batch_to_device(batch)
