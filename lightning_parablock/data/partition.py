"""Split a dataset's indices across federated clients: IID, label-skewed, by natural groups, or by topic.

No training framework in here on purpose: a partition is a list of example indices per client, so it can be
computed, saved and inspected anywhere.
"""

from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, Optional

import numpy as np

_MAX_DIRICHLET_TRIES = 1000
_TFIDF_FEATURES = 20_000
_KMEANS_INITS = 10
_INDEX_COLUMN = "__parablock_index__"


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
            counts = apportion(len(shuffled), rng.dirichlet(np.full(num_clients, alpha)), rng)
            for part, chunk in zip(parts, np.split(shuffled, np.cumsum(counts)[:-1])):
                part.extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_size:
            return [sorted(part) for part in parts]
    raise ValueError(
        f"`dirichlet_partition` could not give each of `num_clients={num_clients}` clients at least"
        f" `min_size={min_size}` examples with `alpha={alpha}` in {_MAX_DIRICHLET_TRIES} draws. Increase"
        " `alpha`, lower `num_clients` or `min_size`, or use `iid_partition`."
    )


def apportion(total: int, proportions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Whole counts summing to ``total``, each within one of its exact share ``total * proportion``.

    Largest remainders: every client gets the floor of its share, and the examples left over go one each to the
    clients whose shares lost the most to rounding, ties broken at random. So no client (the last one, say)
    collects the leftovers of every label.
    """
    shares = total * np.asarray(proportions, dtype=np.float64) / np.sum(proportions)
    counts = np.floor(shares).astype(np.int64)
    leftover = total - int(counts.sum())
    order = rng.permutation(len(shares))  # random order first, so a stable sort breaks ties at random
    by_remainder = order[np.argsort(-(shares - counts)[order], kind="stable")]
    counts[by_remainder[:leftover]] += 1
    return counts


def natural_partition(labels: Sequence[Hashable], num_clients: int) -> list[list[int]]:
    """One client per label value, as for data that comes pre-grouped (a ``source`` column, a user id).

    Clients are ordered by the sorted label values (by their ``str`` when values are not comparable), so the
    same labels always give the same clients.

    Returns:
        One sorted list of indices into ``labels`` per client; together they cover every index once.
    """
    values = label_values(labels)
    if num_clients != len(values):
        shown = ", ".join(repr(value) for value in values[:10]) + (", ..." if len(values) > 10 else "")
        raise ValueError(
            f"A natural partition gives one client per label value: `num_clients={num_clients}` but the labels"
            f" take {len(values)} values ({shown}). Set `num_clients={len(values)}`, or use a Dirichlet partition."
        )
    position = {value: client for client, value in enumerate(values)}
    parts: list[list[int]] = [[] for _ in values]
    for index, label in enumerate(labels):
        parts[position[label]].append(index)
    return parts


INSTRUCTION_WORDS = frozenset(
    "write rewrite generate create compose explain list provide identify summarize classify suggest come following"
    " given sentence sentences paragraph text word words example examples short brief way ways using use tell output"
    " input".split()
)
"""Words that say what kind of answer an instruction asks for rather than what it is about; left out of the
clustering with English stop words, so clusters follow topics, not ``the``, ``of`` or ``rewrite``."""


def cluster_labels(texts: Sequence[str], num_clusters: int, seed: int) -> list[int]:
    """Topic pseudo-labels for unlabeled text: k-means over TF-IDF vectors of the raw text, so a Dirichlet split
    can skew topics, as FedNLP clusters unlabeled text for its non-IID splits.

    Stop words (scikit-learn's English list and :data:`INSTRUCTION_WORDS`) are removed, so the clusters follow
    content words. The labels depend only on ``texts``, ``num_clusters`` and ``seed``: cluster before
    tokenizing, and the split is the same whatever the tokenizer or ``max_length``.

    Returns:
        The cluster id (``0 .. num_clusters - 1``) of every text.
    """
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer

    if num_clusters < 1:
        raise ValueError(f"`num_clusters` must be a positive integer, got {num_clusters}.")
    if num_clusters > len(texts):
        raise ValueError(
            f"Cannot form `num_clusters={num_clusters}` clusters from {len(texts)} texts; use at most {len(texts)}."
        )
    stop_words = sorted(ENGLISH_STOP_WORDS | INSTRUCTION_WORDS)
    vectorizer = TfidfVectorizer(max_features=_TFIDF_FEATURES, sublinear_tf=True, stop_words=stop_words)
    try:
        vectors = vectorizer.fit_transform(texts)
    except ValueError as error:  # scikit-learn: "empty vocabulary; perhaps the documents only contain stop words"
        if "empty vocabulary" not in str(error):
            raise
        raise ValueError(
            f"`partition='cluster'` found no content word to cluster by in the {len(texts)} texts (the instructions"
            " and inputs, or a conversation's user turns): every word is a stop word or too short. Split by a column"
            " instead (`partition='dirichlet'` or `'natural'` with `label_column`), or use `partition='iid'`."
        ) from None
    kmeans = KMeans(n_clusters=num_clusters, n_init=_KMEANS_INITS, random_state=seed)
    return kmeans.fit_predict(vectors).tolist()


def partition_with_flwr(partitioner: Any, dataset: Any) -> list[list[int]]:
    """Indices per client from a flwr-datasets ``Partitioner`` applied to a Hugging Face ``Dataset``.

    Lets any Flower partitioner (shard, pathological, size-based, ...) drive the split: the partitioner sees the
    dataset with an extra index column, and each partition it loads is read back as indices.
    """
    indexed = dataset.add_column(_INDEX_COLUMN, list(range(len(dataset))))
    partitioner.dataset = indexed
    return [sorted(partitioner.load_partition(i)[_INDEX_COLUMN]) for i in range(partitioner.num_partitions)]


def label_histogram(partition: Sequence[Sequence[int]], labels: Sequence[Hashable]) -> list[dict[Hashable, int]]:
    """Count each client's examples per label, to inspect or log how skewed a partition is."""
    return [dict(Counter(labels[index] for index in part)) for part in partition]


def format_partition_table(
    partition: Sequence[Sequence[int]], labels: Optional[Sequence[Hashable]] = None, max_label_columns: int = 12
) -> str:
    """A plain-text table of each client's size and, given labels, its examples per label.

    Labels beyond the ``max_label_columns`` most frequent are summed in an ``other`` column, so the table stays
    readable for hundreds of values. A final ``total`` row sums every column.
    """
    header = ["client", "size"]
    rows = [[str(client), str(len(part))] for client, part in enumerate(partition)]
    total = ["total", str(sum(len(part) for part in partition))]
    if labels is not None:
        histograms = label_histogram(partition, labels)
        counts = Counter(labels[index] for part in partition for index in part)
        shown = [value for value, _ in counts.most_common(max_label_columns)]
        shown = label_values(shown)
        others = len(counts) > len(shown)
        header += [str(value) for value in shown] + (["other"] if others else [])
        for row, histogram in zip(rows, histograms):
            row += [str(histogram.get(value, 0)) for value in shown]
            if others:
                row.append(str(sum(n for value, n in histogram.items() if value not in shown)))
        total += [str(counts[value]) for value in shown]
        if others:
            total.append(str(sum(n for value, n in counts.items() if value not in shown)))
    table = [header, *rows, total]
    widths = [max(len(row[column]) for row in table) for column in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(lines)


def label_values(labels: Iterable[Hashable]) -> list[Hashable]:
    """The distinct labels in a stable order: sorted, or sorted by ``str`` when the values are not comparable."""
    values = set(labels)
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)
