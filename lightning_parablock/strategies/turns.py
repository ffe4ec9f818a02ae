"""This rank's turns: whose view of the model is loaded, whose optimizer Lightning steps, and for how long.

A round is a sequence of turns, one per hosted participant, padded with idle turns so that every rank runs the
same number of batches. In an idle turn the rank steps an optimizer of its own over one parameter that lives on
the training device and gets a zero gradient every step, so that what Lightning does around a step (mixed
precision's scaler included) finds what it expects without touching the model.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_parablock.core.federation import Federation
from lightning_parablock.core.turn_timer import TurnTimer


class Turns:
    """Starts and ends this rank's turns over ``federation`` and times them.

    Args:
        federation: the clients' state on top of the global model.
        device: the training device (for the idle parameter and the turn timer's events).
    """

    def __init__(self, federation: Federation, device: torch.device) -> None:
        self.federation = federation
        self.timer = TurnTimer(device)
        self.idle = False  # this rank waits through a turn while other ranks train
        self._idle_parameter = nn.Parameter(torch.zeros(1, device=device))
        self.idle_optimizer = torch.optim.SGD([self._idle_parameter], lr=0.0)

    @property
    def client(self) -> Optional[int]:
        """The client whose view is loaded, or ``None`` (between turns, or idle)."""
        return self.federation.active_client

    def start(self, client: Optional[int], round_index: int, block: int) -> Optimizer:
        """End the turn in progress and start ``client``'s (``None``: an idle turn); the optimizer to step."""
        self.end()
        if client is None:
            self.idle = True
            optimizer = self.idle_optimizer
        else:
            optimizer = self.federation.enter(client, round_index, block)
        self.timer.start()
        return optimizer

    def end(self, record: bool = True) -> Optional[int]:
        """End the turn in progress (keeping the client's delta unless ``record`` is false); the client it was."""
        if self.idle:
            self.idle = False
            self.timer.stop(None)
            return None
        client = self.federation.leave(record)
        if client is not None:
            self.timer.stop(client)  # read at the round's end: no device-wide synchronize per turn
        return client

    def idle_loss(self) -> Tensor:
        """The loss of an idle step: zero, with a zero gradient for the idle parameter alone."""
        return self._idle_parameter.sum() * 0.0

    def compute_seconds(self) -> dict[int, float]:
        """Seconds of every client turn ended since the last call."""
        return self.timer.resolve()
