"""A tiny synthetic instruction task that stands in for MathInstruct.

MathInstruct mixes problems from several sources; federated papers split it across clients by that
``source`` column to get label skew. This task keeps the same three columns (``source``,
``instruction``, ``output``) with a handful of problem kinds over small numbers, so that a ~1M-parameter
model learns it measurably in a few hundred CPU steps and a non-IID split has something to skew.
"""

import random
from collections.abc import Sequence
from typing import Callable

from datasets import Dataset

_Problem = tuple[str, str]


def _addition(rng: random.Random) -> _Problem:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"What is {a} + {b}?", str(a + b)


def _subtraction(rng: random.Random) -> _Problem:
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    return f"What is {a} - {b}?", str(a - b)


def _multiplication(rng: random.Random) -> _Problem:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} * {b}?", str(a * b)


def _comparison(rng: random.Random) -> _Problem:
    a, b = rng.sample(range(100), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _parity(rng: random.Random) -> _Problem:
    a = rng.randint(0, 99)
    return f"Is {a} even or odd?", "odd" if a % 2 else "even"


def _minimum(rng: random.Random) -> _Problem:
    a, b = rng.sample(range(100), 2)
    return f"Which is smaller, {a} or {b}?", str(min(a, b))


def _doubling(rng: random.Random) -> _Problem:
    a = rng.randint(0, 49)
    return f"What is twice {a}?", str(2 * a)


def _remainder(rng: random.Random) -> _Problem:
    a, b = rng.randint(0, 99), rng.randint(2, 9)
    return f"What is {a} mod {b}?", str(a % b)


PROBLEM_KINDS: dict[str, Callable[[random.Random], _Problem]] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "comparison": _comparison,
    "parity": _parity,
}
"""Generator per ``source`` value of the default task; every answer is at most four characters."""

EXTRA_PROBLEM_KINDS: dict[str, Callable[[random.Random], _Problem]] = {
    "minimum": _minimum,
    "doubling": _doubling,
    "remainder": _remainder,
}
"""Kinds outside the default task, for a fine-tuning task a model pretrained on the default kinds has not seen."""

_ALL_KINDS = {**PROBLEM_KINDS, **EXTRA_PROBLEM_KINDS}


def make_arithmetic_dataset(num_examples: int, seed: int, kinds: Sequence[str] = tuple(PROBLEM_KINDS)) -> Dataset:
    """Draw ``num_examples`` problems, each of a kind chosen uniformly from ``kinds``; the same seed and kinds give
    the same rows.

    Returns:
        A ``datasets.Dataset`` with string columns ``source``, ``instruction`` and ``output``.
    """
    if num_examples < 0:
        raise ValueError(f"`num_examples` must be a non-negative integer, got {num_examples}.")
    check_kinds(kinds)
    rng = random.Random(seed)
    sources = list(kinds)
    rows: dict[str, list[str]] = {"source": [], "instruction": [], "output": []}
    for _ in range(num_examples):
        source = rng.choice(sources)
        instruction, output = _ALL_KINDS[source](rng)
        rows["source"].append(source)
        rows["instruction"].append(instruction)
        rows["output"].append(output)
    return Dataset.from_dict(rows)


def check_kinds(kinds: Sequence[str]) -> None:
    """Refuse an empty, repeated or unknown list of problem kinds, naming what is accepted."""
    if isinstance(kinds, str) or not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(_ALL_KINDS):
        raise ValueError(f"`kinds` must be distinct names from {sorted(_ALL_KINDS)}, got {kinds!r}.")
