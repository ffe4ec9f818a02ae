"""Packing: several short tokenized examples per row, each still trained as if alone.

Alpaca-length examples padded to the longest of a batch waste most of every row on padding. A packed row holds
several examples back to back; ``position_ids`` restart at 0 for each, and the first token of each example gets
label ``-100``, so no example learns to predict the next one's start. Attention must not cross examples either,
and how to keep it apart depends on the model, so :func:`choose_packed_attention` measures it on the model itself:

- ``"position_ids"``: no ``attention_mask`` is passed and transformers detects the packed sequences from the
  restarting position ids (SDPA and eager get a block-diagonal causal mask, flash-attention its variable-length
  kernel): models built on transformers' ``create_causal_mask`` that pass it ``position_ids`` (Llama, Qwen2,
  Mistral, Gemma, GPT-2, GPT-NeoX ...).
- ``"mask"``: the model ignores packed position ids but takes a 4D attention mask, so it gets
  :func:`packed_attention_mask`, causal and block-diagonal (OPT, MPT ...).
- neither (Bloom ...): packing is refused.

Either way the per-example losses are those of the examples run alone. Rows are filled best-fit-decreasing, each
client's shard on its own.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from datasets import Dataset as HFDataset
from torch import Tensor, nn
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
    """Right-pad packed rows into ``input_ids``, ``labels`` and ``position_ids``, without an attention mask (the
    model adds one, if it needs one, from the position ids: :func:`with_packed_attention`).

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


PackedAttention = Literal["position_ids", "mask"]
"""How a model keeps the examples of a packed row apart: see the module's docstring."""


def is_packed_batch(batch: Mapping[str, Any]) -> bool:
    """Whether ``batch`` is one of :class:`PackedCollator`'s: ``position_ids`` and no ``attention_mask``."""
    return "position_ids" in batch and "attention_mask" not in batch


def packed_attention_mask(position_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``(batch, 1, length, length)`` causal, block-diagonal mask of packed rows: a new sequence starts at
    each position id 0 (the padding too).

    Additive (0 where a token may attend, the dtype's lowest value elsewhere) rather than boolean, because eager
    attention adds the mask to its scores; SDPA takes either. Every token sees itself, so no row is all masked.
    """
    if position_ids.dim() != 2:
        raise ValueError(f"`position_ids` must be (batch, length), got shape {tuple(position_ids.shape)}.")
    sequence = (position_ids == 0).cumsum(-1)
    length = position_ids.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (sequence[:, :, None] == sequence[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def with_packed_attention(batch: Mapping[str, Tensor], path: PackedAttention, dtype: torch.dtype) -> dict[str, Tensor]:
    """A packed ``batch`` as the model needs it on ``path``: unchanged for ``"position_ids"``, with
    :func:`packed_attention_mask` in ``dtype`` for ``"mask"``."""
    if path == "position_ids":
        return dict(batch)
    return {**batch, "attention_mask": packed_attention_mask(batch["position_ids"], dtype)}


PROBE_LENGTHS = (8, 5)
"""The two examples the probe packs into one row: a few tokens, the longer first so the second has more to leak
from."""


def probe_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the probe's logits: four rounding steps of ``dtype``, of TF32 or bf16 where fp32
    matmuls run in those (``torch.set_float32_matmul_precision``), and never below 1e-4."""
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        eps = 2.0**-10 if torch.get_float32_matmul_precision() == "high" else 2.0**-7
    return max(1e-4, 4 * eps)


def choose_packed_attention(model: nn.Module, dtype: torch.dtype) -> PackedAttention:
    """The first path (position ids alone, then the 4D mask in ``dtype``) on which two short examples packed in
    one row give ``model`` the logits each has alone; ``ValueError`` naming the model if neither does.

    A real check on the model as it will train (its attention implementation, dtype and device), so no list of
    architectures goes stale. A path passes when its logits are within the dtype's tolerance of the examples'
    alone (or four times their own rounding noise at another shape, the padded batch, if that is larger: a deep
    bf16 model on a GPU) and within half of how far they move when nothing separates the examples (the row as
    one sequence): in bf16 a small random model's leak can hide inside the rounding tolerance, never inside the
    leak itself. Cheap: six forwards of at most 13 tokens, without gradients, in eval mode (each submodule's
    train flag restored after). It draws no random numbers (fixed tokens; eval mode turns dropout off), so the RNG
    streams training uses are untouched.
    """
    config = getattr(model, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"Packing probes the model with token ids; {type(model).__name__} has no config.vocab_size.")
    device = next(model.parameters()).device
    examples = [
        (torch.arange(n, device=device) * (5 + 2 * i) + 3 + i) % vocab_size for i, n in enumerate(PROBE_LENGTHS)
    ]
    input_ids = torch.cat(examples)[None]
    row = {
        "input_ids": input_ids,
        "position_ids": torch.cat([torch.arange(len(e), device=device) for e in examples])[None],
    }
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            alone = torch.cat([model(input_ids=e[None], use_cache=False).logits for e in examples], 1)
            tolerance = probe_tolerance(alone.dtype) * alone.abs().max().item()
            alone = alone.float()
            allowed = max(tolerance, 4 * _shape_noise(model, examples, alone))
            leak = _packed_difference(model, {"input_ids": input_ids}, alone)
            bound = min(allowed, leak / 2) if isinstance(leak, float) else allowed
            outcomes = {}
            for path in ("position_ids", "mask"):
                outcome = _packed_difference(model, with_packed_attention(row, path, dtype), alone)
                if isinstance(outcome, float) and outcome <= bound:
                    return path
                outcomes[path] = outcome
    finally:
        for module, training in modes.items():
            module.train(training)
    found = {path: f"differ by {o:.3g}" if isinstance(o, float) else f"fail ({o})" for path, o in outcomes.items()}
    raise ValueError(
        f"Packing cannot keep examples apart in {_model_name(model)}: two examples packed in one row, with"
        f" restarting position_ids and no attention mask, give logits that {found['position_ids']} from those of"
        f" each alone, and with a 4D block-diagonal attention mask they {found['mask']} (allowed: {bound:.3g})."
        " Train this model with `packing=False`."
    )


def _shape_noise(model: nn.Module, examples: list[Tensor], alone: Tensor) -> float:
    """How far the examples' logits move when only the kernels' shapes change: the two examples as one right-padded
    batch with an attention mask, the standard path every model takes. A deep model in bf16 on a GPU rounds
    differently at another shape; a packed row may differ from the examples alone by as much, and no more."""
    width = max(len(e) for e in examples)
    input_ids = torch.stack([torch.nn.functional.pad(e, (0, width - len(e))) for e in examples])
    mask = torch.stack([torch.arange(width, device=e.device) < len(e) for e in examples]).long()
    try:
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
    except Exception:  # noqa: BLE001 - a model that cannot pad gives no noise estimate; the dtype's tolerance stands
        return 0.0
    batched = torch.cat([logits[i, : len(e)] for i, e in enumerate(examples)])[None]
    return (batched - alone).abs().max().item()


def _packed_difference(model: nn.Module, batch: Mapping[str, Tensor], alone: Tensor) -> float | str:
    """The largest logit difference of the row from the examples alone, or why the model refused it."""
    try:
        logits = model(**batch, use_cache=False).logits.float()
    except Exception as error:  # noqa: BLE001 - whatever the model raises for an input it cannot take is an answer
        return f"{type(error).__name__}: {error}"
    return (logits - alone).abs().max().item()


def _model_name(model: nn.Module) -> str:
    """The Hugging Face model's class, through a peft wrapper."""
    base = getattr(model, "get_base_model", None)
    return type(base() if callable(base) else model).__name__
