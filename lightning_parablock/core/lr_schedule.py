"""The clients' learning-rate schedule: a pure function of the round and the step within a client's turn.

Positions count local optimizer steps along the federation's progress, not any one client's: step ``k`` of a turn
in round ``t`` is at position ``t × local_steps + k``. Every participant of a round therefore trains at the same
learning rate at the same point of its turn, however many clients share the round and whichever process hosts
them, and idle turns count for nothing. The run is ``rounds × local_steps`` positions long. Nothing of the
schedule is state: a resumed run recomputes it from the round it starts at.

The factor scales each param group's own initial learning rate, kept in ``group["initial_lr"]`` the first time
the group is scheduled (as torch's LR schedulers keep it), so an optimizer kept across turns
(``optimizer_state="per_block"``) is never scaled twice, and each group keeps its own base rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, get_args

from torch import Tensor
from torch.optim import Optimizer

from lightning_parablock.argument_checks import check_choice

LrScheduleKind = Literal["constant", "linear", "cosine"]
LR_SCHEDULE_KINDS: tuple[str, ...] = get_args(LrScheduleKind)


@dataclass(frozen=True)
class LearningRateSchedule:
    """Linear warmup over the first ``warmup_steps`` positions, then ``kind``: ``"constant"``, or a ``"linear"`` or
    ``"cosine"`` decay from the base rate to ``min_lr_ratio`` × it at position ``total_steps``.

    Warmup trains position ``p < warmup_steps`` at ``(p + 1) / warmup_steps`` of the base rate: the first step
    already moves, the last warmup step is at the full rate.
    """

    kind: LrScheduleKind = "constant"
    warmup_steps: int = 0
    total_steps: Optional[int] = None  # needed by the decaying kinds
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_choice("lr_schedule", self.kind, LR_SCHEDULE_KINDS)
        if self.decays and self.total_steps is None:
            raise ValueError(f"A {self.kind!r} learning-rate schedule needs the run's length (`total_steps`).")
        if self.total_steps is not None and self.warmup_steps >= self.total_steps and self.warmup_steps > 0:
            raise ValueError(
                f"The warmup ({self.warmup_steps} local steps) is not shorter than the run ({self.total_steps} local"
                " steps = rounds × local_steps): the learning rate would never reach its value. Use fewer"
                " `warmup_steps` (or a smaller `warmup_ratio`) or more rounds."
            )

    @property
    def decays(self) -> bool:
        return self.kind != "constant"

    @property
    def changes_lr(self) -> bool:
        """Whether any position trains at other than the base rate (the constant schedule without warmup does not)."""
        return self.decays or self.warmup_steps > 0

    def factor(self, position: int) -> float:
        """The multiple of the base learning rate at ``position`` (``round × local_steps + step``)."""
        if position < self.warmup_steps:
            return (position + 1) / self.warmup_steps
        if not self.decays:
            return 1.0
        assert self.total_steps is not None
        progress = min(1.0, (position - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "linear":
            remaining = 1.0 - progress
        else:
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * remaining

    def apply(self, optimizer: Optimizer, position: int) -> None:
        """Set every param group of ``optimizer`` to its initial learning rate × :meth:`factor` (``position``)."""
        factor = self.factor(position)
        for group in optimizer.param_groups:
            if "initial_lr" not in group:
                lr = group["lr"]
                group["initial_lr"] = lr.clone() if isinstance(lr, Tensor) else lr
            scaled = float(group["initial_lr"]) * factor
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(scaled)
            else:
                group["lr"] = scaled

    def run_settings(self) -> dict[str, object]:
        """What a resume must keep: the kind, the warmup and, for a decaying schedule, its length."""
        return {
            "lr_schedule": self.kind,
            "warmup_steps": self.warmup_steps,
            "lr_schedule_steps": self.total_steps if self.decays else None,
            "min_lr_ratio": self.min_lr_ratio,
        }
