"""The federation's settings, checked once when the strategy is built.

:class:`FederationOptions` holds what ``FederatedBlockStrategy(...)`` was given about the federation (clients,
rounds, blocks, schedule, aggregation weights, precision of the active block) after each value has been
refused by name or normalized (``2.0`` clients is 2). It is frozen: a run's settings are saved in its
checkpoints and compared on resume, so nothing changes them once training could have started. The process
arguments that ``DDPStrategy`` takes (device, backend, timeout) are checked by :func:`check_process_options`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional, Union, get_args

import torch
from torch import nn

from lightning_parablock.aggregation.aggregator import Weighting
from lightning_parablock.argument_checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_optional_int,
)
from lightning_parablock.core.blocks import (
    BlockPartition,
    LayerSplit,
    RemainderPolicy,
    compile_block_patterns,
    partition_by_patterns,
    partition_decoder,
)
from lightning_parablock.core.federation import OptimizerStatePolicy
from lightning_parablock.core.lr_schedule import LR_SCHEDULE_KINDS, LearningRateSchedule, LrScheduleKind
from lightning_parablock.core.planning import participants_per_round
from lightning_parablock.core.schedule import SCHEDULE_KINDS, ScheduleKind
from lightning_parablock.strategies.run_settings import RunSettings

DECODER_BLOCK_OPTIONS = ("layers_per_block", "layer_split", "remainder", "include_embeddings", "include_head")
"""How the decoder's layers are cut into blocks; ``block_patterns`` replaces them."""
SCHEDULE_OPTIONS = ("schedule", "schedule_spacing")
"""Which block a round trains; nothing to choose with one block."""
_FLAGS = ("include_embeddings", "include_head", "shuffle", "offload_deltas", "master_weights")
_PROCESS_GROUP_BACKENDS = ("gloo", "nccl", "mpi", "ucc")


@dataclass(frozen=True)
class FederationOptions:
    """The settings of ``FederatedBlockStrategy`` that define the federation (see its docstring for each)."""

    num_clients: int = 10
    local_steps: int = 8
    layers_per_block: int = 1
    layer_split: LayerSplit = "none"
    remainder: RemainderPolicy = "error"
    include_embeddings: bool = False
    include_head: bool = False
    block_patterns: Optional[list[Union[str, list[str]]]] = None
    schedule: ScheduleKind = "random"
    schedule_spacing: Optional[int] = None
    optimizer_state: OptimizerStatePolicy = "reset"
    lr_schedule: LrScheduleKind = "constant"
    warmup_steps: int = 0
    warmup_ratio: Optional[float] = None
    min_lr_ratio: float = 0.0
    global_lr: float = 1.0
    participation: float = 1.0
    clients_per_round: Optional[int] = None
    weighting: Optional[Weighting] = None  # deprecated: the aggregator's
    seed: int = 0
    shuffle: bool = True
    offload_deltas: bool = False
    master_weights: bool = True
    participants_per_round: int = field(init=False)  # from participation or clients_per_round

    def __post_init__(self) -> None:
        normalize = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        normalize("num_clients", check_int("num_clients", self.num_clients, minimum=1))
        normalize("local_steps", check_int("local_steps", self.local_steps, minimum=1))
        normalize("layers_per_block", check_int("layers_per_block", self.layers_per_block, minimum=1))
        check_choice("layer_split", self.layer_split, get_args(LayerSplit))
        check_choice("remainder", self.remainder, get_args(RemainderPolicy))
        check_choice("schedule", self.schedule, SCHEDULE_KINDS)
        normalize("schedule_spacing", check_optional_int("schedule_spacing", self.schedule_spacing, minimum=1))
        if self.schedule_spacing is not None and self.schedule != "spaced":
            raise ValueError(
                f"`schedule_spacing` applies to schedule='spaced' only; got schedule_spacing={self.schedule_spacing}"
                f" with schedule={self.schedule!r}."
            )
        check_choice("optimizer_state", self.optimizer_state, get_args(OptimizerStatePolicy))
        self._check_lr_schedule(normalize)
        if self.weighting is not None:
            check_choice("weighting", self.weighting, get_args(Weighting))
        normalize("global_lr", check_float("global_lr (η)", self.global_lr, minimum=0.0, min_open=True))
        normalize(
            "participation", check_float("participation", self.participation, minimum=0.0, maximum=1.0, min_open=True)
        )
        normalize("clients_per_round", check_optional_int("clients_per_round", self.clients_per_round, minimum=1))
        normalize("seed", check_int("seed", self.seed, minimum=0))
        for name in _FLAGS:
            check_bool(name, getattr(self, name))
        if self.block_patterns is not None:
            compile_block_patterns(self.block_patterns)  # refuse a bad pattern now, not when training starts
            self._check_unused_with_patterns()
        normalize(
            "participants_per_round",
            participants_per_round(self.num_clients, self.participation, self.clients_per_round),
        )

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of option ``name``."""
        return cls.__dataclass_fields__[name].default

    def changed(self, names: Sequence[str]) -> dict[str, Any]:
        """Those of the options ``names`` given a value other than their default."""
        return {name: getattr(self, name) for name in names if getattr(self, name) != self.default(name)}

    def _check_unused_with_patterns(self) -> None:
        """Refuse a decoder-block option next to ``block_patterns`` (which replaces the decoder's blocks), and a
        schedule with a single block (which every round trains): a setting that silently does nothing."""
        decoder = self.changed(DECODER_BLOCK_OPTIONS)
        if decoder:
            name, value = next(iter(decoder.items()))
            raise ValueError(
                f"`block_patterns` replaces the decoder's blocks, so `{name}={value!r}` does not apply: leave it at"
                f" its default {self.default(name)!r}, or drop `block_patterns` to cut the decoder's layers into"
                " blocks."
            )
        schedule = self.changed(SCHEDULE_OPTIONS) if len(self.block_patterns) == 1 else {}
        if schedule:
            name, value = next(iter(schedule.items()))
            raise ValueError(
                f"`block_patterns` gives one block, which every round trains, so `{name}={value!r}` does not apply:"
                f" leave it at its default {self.default(name)!r}, or give several blocks."
            )

    def _check_lr_schedule(self, normalize: Any) -> None:
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULE_KINDS)
        normalize("warmup_steps", check_int("warmup_steps", self.warmup_steps, minimum=0))
        if self.warmup_ratio is not None:
            ratio = check_float("warmup_ratio", self.warmup_ratio, minimum=0.0, maximum=1.0, max_open=True)
            normalize("warmup_ratio", ratio)
            if self.warmup_steps:
                raise ValueError(
                    f"Give the warmup as `warmup_steps` or as `warmup_ratio`, not both; got warmup_steps="
                    f"{self.warmup_steps} and warmup_ratio={self.warmup_ratio}."
                )
        normalize("min_lr_ratio", check_float("min_lr_ratio", self.min_lr_ratio, minimum=0.0, maximum=1.0))
        if self.min_lr_ratio and self.lr_schedule == "constant":
            raise ValueError(
                f"`min_lr_ratio={self.min_lr_ratio}` is where a decaying schedule ends; it does not apply to"
                " lr_schedule='constant'. Use lr_schedule='linear' or 'cosine', or leave min_lr_ratio at 0."
            )

    def learning_rate_schedule(self, rounds: Optional[int], limits: str) -> LearningRateSchedule:
        """The clients' schedule over a run of ``rounds`` rounds (``None``: the run has no set end, which a decaying
        schedule or a ``warmup_ratio`` refuses, naming the Trainer's ``limits``)."""
        total = None if rounds is None else rounds * self.local_steps
        if total is None and (self.lr_schedule != "constant" or self.warmup_ratio):
            given = f"lr_schedule={self.lr_schedule!r}" if self.lr_schedule != "constant" else "warmup_ratio"
            raise ValueError(
                f"`{given}` needs the run's length, but the Trainer sets no end ({limits}): set `max_epochs` (one"
                " epoch is one round) or `max_steps`, or use lr_schedule='constant' with `warmup_steps`."
            )
        warmup = self.warmup_steps
        if self.warmup_ratio and total is not None:
            warmup = math.ceil(self.warmup_ratio * total)
        return LearningRateSchedule(self.lr_schedule, warmup, total, self.min_lr_ratio)

    def partition(self, model: nn.Module) -> BlockPartition:
        """The model's blocks: by ``block_patterns`` where given, else by the decoder's layers."""
        if self.block_patterns is not None:
            return partition_by_patterns(model, self.block_patterns)
        return partition_decoder(
            model,
            layers_per_block=self.layers_per_block,
            layer_split=self.layer_split,
            remainder=self.remainder,
            include_embeddings=self.include_embeddings,
            include_head=self.include_head,
        )

    def spacing(self, staleness: Optional[int]) -> int:
        """The spaced schedule's window: as asked, else the exchange's staleness (at least 1); 1 for the others."""
        if self.schedule != "spaced":
            return 1
        return self.schedule_spacing or max(1, staleness or 1)

    def spacing_shortfall(self, num_blocks: int, staleness: Optional[int]) -> Optional[str]:
        """Why the spaced schedule cannot keep its promise with ``num_blocks`` blocks, or ``None`` when it can.

        With no more blocks than the window, some round must train a block trained within the window: under
        staleness s that client trains on top of its own delta, still pending.
        """
        spacing = self.spacing(staleness)
        if self.schedule != "spaced" or num_blocks > spacing:
            return None
        return (
            f"schedule='spaced' keeps a block out of the {spacing} rounds after it is trained, but the model has only"
            f" {num_blocks} block(s): every {num_blocks} rounds a block comes back while its delta from"
            f" {num_blocks} round(s) before is still pending (staleness {staleness}). Use more blocks than {spacing}"
            f" (a smaller `layers_per_block`), or a staleness below {num_blocks}."
        )

    def run_settings(self, staleness: Optional[int]) -> RunSettings:
        """The options that define the run (:mod:`~lightning_parablock.strategies.run_settings`), under the names
        checkpoints have always used; where deltas live (``offload_deltas``) and how blocks are cut (checked
        against the checkpoint's own partition) are left out."""
        return {
            "seed": self.seed,
            "schedule": self.schedule,
            "schedule_spacing": self.spacing(staleness),
            "clients_per_round": self.participants_per_round,
            "local_steps": self.local_steps,
            "optimizer_state": self.optimizer_state,
            "global_lr": self.global_lr,
            "shuffle": self.shuffle,
            "master_weights": self.master_weights,
        }


def check_process_options(
    device: Any, process_group_backend: Optional[str], timeout: Optional[timedelta]
) -> Optional[torch.device]:
    """Refuse a device, backend or timeout ``DDPStrategy`` would only trip over once processes start.

    Returns ``device`` as a ``torch.device`` with an index where it is a GPU: ``"cuda"`` alone would leave
    streams, events and the comm thread to whatever device is current (``cuda:0`` in a fresh thread) instead
    of the one training runs on.
    """
    if process_group_backend is not None:
        backends = [part.split(":")[-1] for part in str(process_group_backend).split(",")]
        if not isinstance(process_group_backend, str) or any(b not in _PROCESS_GROUP_BACKENDS for b in backends):
            raise ValueError(
                f"`process_group_backend` must be one of {', '.join(map(repr, _PROCESS_GROUP_BACKENDS))} (or a"
                f" per-device list such as 'cpu:gloo,cuda:nccl'), or None to choose by device; got"
                f" {process_group_backend!r}."
            )
    if timeout is not None and not (isinstance(timeout, timedelta) and timeout.total_seconds() > 0):
        raise ValueError(f"`timeout` must be a positive `datetime.timedelta` or None, got {timeout!r}.")
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"`device` must be a torch device such as 'cpu', 'cuda' or 'cuda:1', or None to follow the Trainer's"
            f" `devices`; got {device!r} ({error})."
        ) from None
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", 0)
    return resolved
