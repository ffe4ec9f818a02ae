"""Which block a round trains.

The seeded schedules are pure functions of ``(seed, round)`` so that a resumed run, a
reference loop and every process of a multi-process run agree without sharing any
random state. The gradient-guided schedule looks at the model instead: its choices
cannot be re-derived, so it keeps them and a checkpoint carries them.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Literal, Optional, get_args

import torch

from lightning_parablock.argument_checks import check_int
from lightning_parablock.core.rng import Stream, stream_generator

ScheduleKind = Literal["random", "sequential", "reverse", "permutation", "spaced", "gradient"]
PURE_SCHEDULE_KINDS: tuple[str, ...] = ("random", "sequential", "reverse", "permutation", "spaced")
SCHEDULE_KINDS: tuple[str, ...] = get_args(ScheduleKind)

BlockGradientNorms = Callable[[int], list[float]]
"""The gradient norm of every block of the model at the start of a round (given the round index)."""


class BlockSchedule:
    """Maps a round to a block index.

    ``random`` (the paper's default) draws a block uniformly each round; ``sequential``
    walks the blocks from the first layer up; ``reverse`` from the last layer down;
    ``permutation`` visits every block once per cycle of ``num_blocks`` rounds, in a fresh
    seeded order each cycle; ``spaced`` draws uniformly among the blocks not trained in the
    last ``spacing`` rounds (with ``B <= spacing`` blocks, among those not trained in the last
    ``B - 1``), so that under staleness ``s = spacing`` no client trains a block whose own delta
    is still unaggregated; ``gradient`` (the paper's gradient-guided variant) trains the
    block whose gradient is largest at the round's start, as measured by
    ``block_gradient_norms`` (a full backward on a probe batch; its seconds are kept in
    :attr:`probe_seconds` so the timeline can charge them).

    ``spaced`` depends on the rounds before, yet stays a pure function of ``(seed, spacing,
    round)``: round ``t`` draws its pick from its own seeded stream and the history is rebuilt
    from round 0 on first use (then kept), so a resumed run and every rank agree without state.
    """

    def __init__(
        self,
        kind: ScheduleKind,
        num_blocks: int,
        seed: int = 0,
        block_gradient_norms: Optional[BlockGradientNorms] = None,
        spacing: int = 1,
    ) -> None:
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"Block schedule must be one of {SCHEDULE_KINDS}, got {kind!r}.")
        if num_blocks < 1:
            raise ValueError(f"A block schedule needs at least one block, got {num_blocks}.")
        if (kind == "gradient") != (block_gradient_norms is not None):
            raise ValueError(
                "The 'gradient' schedule needs `block_gradient_norms` and the other schedules take none;"
                f" got kind={kind!r} and block_gradient_norms={block_gradient_norms!r}."
            )
        check_int("spacing", spacing, minimum=1)
        if spacing != 1 and kind != "spaced":
            raise ValueError(
                f"`spacing` applies to the 'spaced' schedule only; got spacing={spacing} with kind={kind!r}."
            )
        self.kind = kind
        self.num_blocks = num_blocks
        self.seed = seed
        self.spacing = spacing
        self.spaced_history: list[int] = []  # round -> block, the ``spaced`` schedule's draws so far
        self.block_gradient_norms = block_gradient_norms
        self.choices: dict[int, int] = {}  # round -> block, for the gradient schedule
        self.probe_seconds: dict[int, float] = {}  # round -> seconds the probe took on this process

    def block_for_round(self, round_index: int) -> int:
        if round_index < 0:
            raise ValueError(f"Rounds count from 0, got {round_index}.")
        if self.kind == "sequential":
            return round_index % self.num_blocks
        if self.kind == "reverse":
            return self.num_blocks - 1 - round_index % self.num_blocks
        if self.kind == "permutation":
            cycle, position = divmod(round_index, self.num_blocks)
            order = torch.randperm(self.num_blocks, generator=stream_generator(self.seed, Stream.BLOCK_PERMUTATION, cycle))
            return int(order[position])
        if self.kind == "spaced":
            return self._spaced_choice(round_index)
        if self.kind == "gradient":
            return self._gradient_choice(round_index)
        generator = stream_generator(self.seed, Stream.RANDOM_BLOCK, round_index)
        return int(torch.randint(self.num_blocks, (1,), generator=generator))

    def _spaced_choice(self, round_index: int) -> int:
        window = min(self.spacing, self.num_blocks - 1)
        history = self.spaced_history
        while len(history) <= round_index:
            recent = set(history[max(0, len(history) - window) :]) if window else set()
            allowed = [block for block in range(self.num_blocks) if block not in recent]
            generator = stream_generator(self.seed, Stream.SPACED_BLOCK, len(history))
            history.append(allowed[int(torch.randint(len(allowed), (1,), generator=generator))])
        return history[round_index]

    def _gradient_choice(self, round_index: int) -> int:
        if round_index in self.choices:
            return self.choices[round_index]
        started = time.perf_counter()
        norms = self.block_gradient_norms(round_index)
        self.probe_seconds[round_index] = time.perf_counter() - started
        if len(norms) != self.num_blocks:
            raise ValueError(f"`block_gradient_norms` returned {len(norms)} norms for {self.num_blocks} blocks.")
        self.choices[round_index] = max(range(self.num_blocks), key=lambda b: norms[b])  # first of equal norms
        return self.choices[round_index]

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run cannot re-derive (the gradient schedule's past choices) and what it must repeat."""
        return {"kind": self.kind, "spacing": self.spacing, "choices": dict(self.choices)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"The checkpoint used the {state['kind']!r} block schedule, this run {self.kind!r}.")
        if state.get("spacing", 1) != self.spacing:  # checkpoints before "spaced" carry none: spacing 1
            raise ValueError(
                f"The checkpoint's block schedule used spacing={state['spacing']}, this run spacing={self.spacing};"
                " resume with the same spacing, or its blocks differ from the checkpoint's rounds on."
            )
        self.choices = {int(r): int(b) for r, b in state["choices"].items()}
