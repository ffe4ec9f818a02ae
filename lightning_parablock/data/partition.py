"""Split a dataset's indices across federated clients, IID or label-skewed.

Pure NumPy on purpose: a partition is a list of example indices per client, with no framework in it,
so it can be computed, saved and inspected anywhere.
"""

from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np

_MAX_DIRICHLET_TRIES = 1000


def _check_num_clients(num_clients: int, num_examples: int, min_size: int = 1) -> None:
    if num_clients < 1:
        raise ValueError(f"`num_clients` must be a positive integer, got {num_clients}.")
    if num_clients * min_size > num_examples:
        raise ValueError(
            f"Cannot give each of `num_clients={num_clients}` clients at least {min_size} example(s) from"
            f" {num_examples} examples; use at most {num_examples // min_size} clients."
        )


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[list[int]]:
    """Shuffle the indices and deal them into ``num_clients`` parts whose sizes differ by at most one.

    Returns:
        One sorted list of indices into ``range(num_examples)`` per client; together they cover every index once.
    """
    _check_num_clients(num_clients, num_examples)
    permutation = np.random.default_rng(seed).permutation(num_examples)
    return [sorted(part.tolist()) for part in np.array_split(permutation, num_clients)]


def dirichlet_partition(
    labels: Sequence[Hashable], num_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """Label-skewed split: for each label, share its examples among clients by proportions drawn from
    ``Dirichlet(alpha, ..., alpha)`` (Hsu et al., 2019, as used across FL benchmarks).

    Small ``alpha`` gives each client few labels, large ``alpha`` approaches an IID split. A draw that leaves
    some client with fewer than ``min_size`` examples is redrawn, a bounded number of times.

    Returns:
        One sorted list of indices into ``labels`` per client; together they cover every index once.
    """
    if alpha <= 0:
        raise ValueError(f"`alpha` must be a positive float, got {alpha}.")
    if min_size < 0:
        raise ValueError(f"`min_size` must be a non-negative integer, got {min_size}.")
    _check_num_clients(num_clients, len(labels), min_size)
    rng = np.random.default_rng(seed)
    by_label: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)

    for _ in range(_MAX_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for indices in by_label.values():
            shuffled = rng.permutation(indices)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(int)
            for part, chunk in zip(parts, np.split(shuffled, cuts)):
                part.extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_size:
            return [sorted(part) for part in parts]
    raise ValueError(
        f"`dirichlet_partition` could not give each of `num_clients={num_clients}` clients at least"
        f" `min_size={min_size}` examples with `alpha={alpha}` in {_MAX_DIRICHLET_TRIES} draws. Increase"
        " `alpha`, lower `num_clients` or `min_size`, or use `iid_partition`."
    )


def label_histogram(partition: Sequence[Sequence[int]], labels: Sequence[Hashable]) -> list[dict[Hashable, int]]:
    """Count each client's examples per label, to inspect or log how skewed a partition is."""
    return [dict(Counter(labels[index] for index in part)) for part in partition]
