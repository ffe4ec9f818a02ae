"""Packing: several short tokenized examples per row, each still trained as if alone.

Alpaca-length examples padded to the longest of a batch waste most of every row on padding. A packed row holds
several examples back to back; ``position_ids`` restart at 0 for each, and no ``attention_mask`` is passed, so
transformers treats the row as packed sequences: SDPA and eager attention get a block-diagonal causal mask, and
flash-attention its variable-length kernel, from the position ids (every model built on transformers'
``create_causal_mask``: Llama, Qwen2, Mistral, Gemma ...). Attention never crosses examples, and the first token
of each example gets label ``-100``, so no example learns to predict the next one's start: the per-example losses
are those of the examples run alone. Rows are filled best-fit-decreasing, each client's shard on its own.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset as HFDataset
from torch.utils.data import Dataset

from lightning_parablock.data.formatting import IGNORE_INDEX


def pack_lengths(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most ``max_length`` tokens (best fit, longest first).

    Returns:
        One list of indices into ``lengths`` per row, each in ascending order; every index appears once.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(
            f"Example {too_long[0]} has {lengths[too_long[0]]} tokens, more than max_length={max_length}; cut examples"
            " to max_length before packing."
        )
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the tightest row that fits is found by bisection
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[index], -1))
        if at == len(free):
            rows.append([index])
            room, row = max_length, len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(index)
        if room - lengths[index] > 0:
            bisect.insort(free, (room - lengths[index], row))
    return [sorted(row) for row in rows]


class PackedDataset(Dataset):
    """Rows of packed examples from a tokenized dataset; :meth:`pack_shards` repacks it client by client.

    Args:
        examples: tokenized examples with ``input_ids`` and ``labels``.
        max_length: tokens per row at most.
    """

    def __init__(self, examples: HFDataset, max_length: int) -> None:
        self.examples = examples
        self.max_length = max_length
        self.lengths = [len(ids) for ids in examples["input_ids"]]
        self.rows: list[list[int]] = []
        self.pack_shards([list(range(len(self.lengths)))])

    def pack_shards(self, shards: Sequence[Sequence[int]]) -> list[list[int]]:
        """Pack each shard of example indices into rows of its own; returns each shard's row indices."""
        self.rows, row_shards = [], []
        for shard in shards:
            packed = pack_lengths([self.lengths[i] for i in shard], self.max_length)
            first = len(self.rows)
            self.rows.extend([shard[i] for i in row] for row in packed)
            row_shards.append(list(range(first, len(self.rows))))
        return row_shards

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        input_ids, labels, position_ids = [], [], []
        for example in self.examples.select(self.rows[index]):
            input_ids += example["input_ids"]
            labels += [IGNORE_INDEX, *example["labels"][1:]]  # the first token is never predicted from this example
            position_ids += range(len(example["input_ids"]))
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


@dataclass(frozen=True)
class PackedCollator:
    """Right-pad packed rows into ``input_ids``, ``labels`` and ``position_ids``, without an attention mask.

    The padding is a sequence of its own (its position ids restart at 0) with label ``-100``: it attends only to
    itself and no example attends to it.
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("`PackedCollator` got an empty list of rows; pass at least one.")
        width = max(len(feature["input_ids"]) for feature in features)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for feature in features:
            pad = width - len(feature["input_ids"])
            batch["input_ids"].append(list(feature["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(feature["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(list(feature["position_ids"]) + list(range(pad)))
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}
