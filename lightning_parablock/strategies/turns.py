"""This rank's rounds and turns: which block is unfrozen, whose view of the model is loaded, and for how long.

A round unfreezes its block and is a sequence of turns, one per hosted participant, padded with idle turns so
that every rank runs the same number of batches. In an idle turn the rank steps an optimizer of its own over one
parameter that lives on the training device and gets a zero gradient every step, so that what Lightning does
around a step (mixed precision's scaler included) finds what it expects without touching the model. When
training ends, the module gets back the ``requires_grad`` flags it came with.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_parablock.core.federation import Federation
from lightning_parablock.core.planning import RoundPlan
from lightning_parablock.core.turn_timer import TurnTimer


@dataclass
class RoundState:
    """What this rank knows about the round in progress."""

    index: int
    block: int
    participants: list[int]
    turns: list[Optional[int]]  # the client of each of this rank's turns; None: idle while other ranks train
    compute_seconds: dict[int, float] = field(default_factory=dict)
    probe_seconds: float = 0.0  # the gradient schedule's probe before the round, measured
    sync_download_bytes: dict[int, int] = field(default_factory=dict)  # per client, before its turn (FedCyBGD)
    closed: bool = False  # the boundary has been applied: a consistent state to checkpoint


class Turns:
    """Starts and ends this rank's rounds and turns over ``federation`` and times the turns.

    Args:
        federation: the clients' state on top of the global model.
        device: the training device (for the idle parameter and the turn timer's events).
        plan: who trains which block in which of this rank's turns.
        trainable: names of the parameters the module left trainable; the others stay frozen in every block.
    """

    def __init__(
        self,
        federation: Federation,
        device: torch.device,
        plan: RoundPlan,
        trainable: Set[str],
    ) -> None:
        self.federation = federation
        self.plan = plan
        self.trainable = set(trainable)
        self.timer = TurnTimer(device)
        self.current: Optional[RoundState] = None
        self.idle = False  # this rank waits through a turn while other ranks train
        self._idle_parameter = nn.Parameter(torch.zeros(1, device=device))
        self.idle_optimizer = torch.optim.SGD([self._idle_parameter], lr=0.0)

    @property
    def round_open(self) -> bool:
        """A round has begun and its boundary is not applied yet: no consistent state to save."""
        return self.current is not None and not self.current.closed

    def start_round(self, round_index: int) -> RoundState:
        """Unfreeze the round's block; its turns start with :meth:`start_turn`."""
        plan = self.plan
        block = plan.block_of(round_index)
        self.current = RoundState(round_index, block, plan.participants_of(round_index), plan.turns_of(round_index))
        self.current.probe_seconds = plan.schedule.probe_seconds.get(round_index, 0.0)
        self.federation.partition.freeze_all_but(self.federation.model, block, self.trainable)
        return self.current

    def start_turn(self, turn: int) -> Optimizer:
        """End the turn in progress and start this rank's ``turn``-th turn of the round (a client's, or idle);
        the optimizer to step."""
        assert self.current is not None, "no round in progress"
        assert self.federation.active_client is None, "end the client's turn first (the strategy's `end_turn`)"
        self.end_turn()  # an idle turn, if one is in progress
        client = self.current.turns[turn]
        if client is None:
            self.idle = True
            optimizer = self.idle_optimizer
        else:
            optimizer = self.federation.start_turn(client, self.current.index, self.current.block)
        self.timer.start()
        return optimizer

    def end_turn(self, record: bool = True) -> Optional[tuple[int, int]]:
        """End the turn in progress (keeping the client's delta unless ``record`` is false); ``(client, round)`` of
        a client's turn, ``None`` for an idle one or none."""
        if self.idle:
            self.idle = False
            self.timer.stop(None)
            return None
        client = self.federation.end_turn(record)
        if client is None:
            return None
        self.timer.stop(client)  # read at the round's end: no device-wide synchronize per turn
        return client, self.current.index

    def end_round(self) -> RoundState:
        """After the round's last turn: the model holds the global values again and the round's deltas are pending."""
        assert self.current is not None, "no round in progress"
        self.current.compute_seconds.update(self.timer.resolve())
        self.federation.round_trained(self.current.index, self.current.block)
        return self.current

    def close_round(self) -> None:
        """The round's boundary is applied."""
        assert self.current is not None, "no round in progress"
        self.current.closed = True

    def idle_loss(self) -> Tensor:
        """The loss of an idle step: zero, with a zero gradient for the idle parameter alone."""
        return self._idle_parameter.sum() * 0.0

    def restore_trainable(self) -> None:
        """Give back the ``requires_grad`` flags the module had before training."""
        for name, param in self.federation.model.named_parameters():
            param.requires_grad_(name in self.trainable)
