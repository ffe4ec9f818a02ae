"""Which parameters form block ``b``: the unit a ParaBlock round trains and ships.

A partition is a list of disjoint groups of parameter names. Parameters that are
in no block stay frozen for the whole run (by default the embeddings and the
head of a decoder model). Nothing here knows about rounds or Lightning.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, Union

from torch import nn

RemainderPolicy = Literal["error", "last_smaller", "merge_into_last"]
LayerSplit = Literal["none", "attention_mlp"]

# Child modules of a decoder layer that form the attention half when a layer is split in two: the
# attention itself and the norm before it. ``post_attention_layernorm`` is Llama's pre-MLP norm, so
# anything named ``post_*`` goes with the MLP half.
_ATTENTION_CHILD = re.compile(r"^(?!post_).*(attn|attention)|^(input_layernorm|ln_1|pre_attention_layernorm)$")


@dataclass(frozen=True)
class Block:
    """One trainable unit: a name for logs and the parameter names it owns."""

    index: int
    name: str
    param_names: tuple[str, ...]


class BlockPartition:
    """Disjoint blocks of a model's parameters, with freezing to the active block."""

    def __init__(self, blocks: Sequence[Block], model: nn.Module) -> None:
        if not blocks:
            raise ValueError("A block partition needs at least one block, got none.")
        params = dict(model.named_parameters())
        seen: dict[str, str] = {}
        for block in blocks:
            if not block.param_names:
                raise ValueError(f"Block {block.name!r} owns no parameters.")
            for name in block.param_names:
                if name not in params:
                    raise ValueError(f"Block {block.name!r} names {name!r}, which is not a parameter of the model.")
                if name in seen:
                    raise ValueError(f"Parameter {name!r} is in both block {seen[name]!r} and block {block.name!r}.")
                seen[name] = block.name
        self.blocks: tuple[Block, ...] = tuple(blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> Block:
        return self.blocks[index]

    def parameters(self, model: nn.Module, index: int) -> dict[str, nn.Parameter]:
        """The parameters of block ``index`` by name, as live objects of ``model``."""
        params = dict(model.named_parameters())
        return {name: params[name] for name in self.blocks[index].param_names}

    def numel(self, model: nn.Module, index: int) -> int:
        return sum(p.numel() for p in self.parameters(model, index).values())

    def freeze_all_but(self, model: nn.Module, index: int, trainable: Optional[set[str]] = None) -> None:
        """Make block ``index`` the only trainable one, among the ``trainable`` parameter names if given.

        ``trainable`` keeps parameters the user froze frozen inside the block. Gradients are
        cleared too: a frozen parameter keeps its ``.grad`` and an optimizer that still holds it
        (AdamW's weight decay) would keep moving it.
        """
        block = self.blocks[index]
        active = set(block.param_names) if trainable is None else set(block.param_names) & trainable
        if not active:
            raise ValueError(
                f"Block {block.name!r} has no trainable parameter: the module froze all of"
                f" {list(block.param_names)[:4]}... Unfreeze them, or leave this block out with `block_patterns`."
            )
        for name, param in model.named_parameters():
            param.requires_grad_(name in active)
            param.grad = None



def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder stack of a transformer: its qualified name and the ``ModuleList``.

    HF decoders keep their layers in one ``ModuleList`` (``model.layers`` for Llama, Qwen2,
    Mistral, Gemma; ``transformer.h`` for GPT-2). Rather than a table of architectures, take
    the list of same-class modules holding the most parameters, which is that stack.
    """
    best: Optional[tuple[int, str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError(
            f"Could not find a stack of decoder layers (an nn.ModuleList of identical layers) in"
            f" {type(model).__name__}. Pass `block_patterns` to name the blocks explicitly."
        )
    return best[1], best[2]


def _layer_groups(num_layers: int, layers_per_block: int, remainder: RemainderPolicy) -> list[list[int]]:
    if layers_per_block < 1:
        raise ValueError(f"`layers_per_block` must be a positive integer, got {layers_per_block}.")
    if layers_per_block > num_layers:
        raise ValueError(
            f"`layers_per_block={layers_per_block}` exceeds the model's {num_layers} layers;"
            f" use a value from 1 to {num_layers}."
        )
    groups = [list(range(i, min(i + layers_per_block, num_layers))) for i in range(0, num_layers, layers_per_block)]
    if len(groups[-1]) != layers_per_block:
        if remainder == "error":
            divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
            raise ValueError(
                f"`layers_per_block={layers_per_block}` does not divide the model's {num_layers} layers."
                f" Use one of {divisors}, or set `remainder` to 'last_smaller' or 'merge_into_last'."
            )
        if remainder == "merge_into_last":
            groups[-2].extend(groups.pop())
        elif remainder != "last_smaller":
            raise ValueError(
                f"`remainder` must be 'error', 'last_smaller' or 'merge_into_last', got {remainder!r}."
            )
    return groups


def _split_attention_mlp(layer_prefix: str, layer: nn.Module) -> tuple[list[str], list[str]]:
    attention, mlp = [], []
    for child_name, child in layer.named_children():
        names = [f"{layer_prefix}.{child_name}.{n}" for n, _ in child.named_parameters()]
        (attention if _ATTENTION_CHILD.search(child_name) else mlp).extend(names)
    for name, _ in layer.named_parameters(recurse=False):
        mlp.append(f"{layer_prefix}.{name}")
    if not attention or not mlp:
        raise ValueError(
            f"Could not split layer {layer_prefix!r} into attention and MLP halves (children:"
            f" {[n for n, _ in layer.named_children()]}). Use `layer_split='none'` or `block_patterns`."
        )
    return attention, mlp


def _outside_params(model: nn.Module, layers_name: str) -> tuple[list[str], list[str]]:
    """Parameters outside the decoder stack, split into those before it (embeddings) and after (norm, head)."""
    before, after = [], []
    names = [n for n, _ in model.named_parameters()]
    stack_positions = [i for i, n in enumerate(names) if n.startswith(layers_name + ".")]
    first_layer_position = stack_positions[0] if stack_positions else len(names)
    for i, name in enumerate(names):
        if name.startswith(layers_name + "."):
            continue
        (before if i < first_layer_position else after).append(name)
    return before, after


def partition_decoder(
    model: nn.Module,
    layers_per_block: int = 1,
    layer_split: LayerSplit = "none",
    remainder: RemainderPolicy = "error",
    include_embeddings: bool = False,
    include_head: bool = False,
) -> BlockPartition:
    """Blocks of consecutive decoder layers (the paper: 2 layers per block for Llama 3-8B).

    ``layer_split='attention_mlp'`` makes each layer two blocks (the paper's "partial" setting).
    Embeddings, and the final norm with the LM head, can each be one more block; tied weights
    appear once, under the embeddings.
    """
    if layer_split not in ("none", "attention_mlp"):
        raise ValueError(f"`layer_split` must be 'none' or 'attention_mlp', got {layer_split!r}.")
    layers_name, layers = find_decoder_layers(model)
    blocks: list[Block] = []

    def add(name: str, param_names: Iterable[str]) -> None:
        blocks.append(Block(index=len(blocks), name=name, param_names=tuple(param_names)))

    before, after = _outside_params(model, layers_name)
    if include_embeddings:
        if not before:
            raise ValueError("`include_embeddings=True` but the model has no parameters before its decoder layers.")
        add("embeddings", before)
    if layer_split == "attention_mlp":
        if layers_per_block != 1:
            raise ValueError(
                f"`layer_split='attention_mlp'` splits single layers; `layers_per_block` must be 1,"
                f" got {layers_per_block}."
            )
        for i, layer in enumerate(layers):
            attention, mlp = _split_attention_mlp(f"{layers_name}.{i}", layer)
            add(f"layer{i}.attention", attention)
            add(f"layer{i}.mlp", mlp)
    else:
        for group in _layer_groups(len(layers), layers_per_block, remainder):
            names = [f"{layers_name}.{i}.{n}" for i in group for n, _ in layers[i].named_parameters()]
            label = f"layers{group[0]}" if len(group) == 1 else f"layers{group[0]}-{group[-1]}"
            add(label, names)
    if include_head:
        if not after:
            raise ValueError("`include_head=True` but the model has no parameters after its decoder layers.")
        add("head", after)
    return BlockPartition(blocks, model)


def compile_block_patterns(block_patterns: Sequence[Union[str, Sequence[str]]]) -> list[list[re.Pattern[str]]]:
    """Each block's compiled patterns; a pattern that is not a regular expression is named with its block."""
    # a string would be read as one block per character
    if isinstance(block_patterns, (str, Mapping)) or not isinstance(block_patterns, Sequence):
        raise TypeError(
            f"`block_patterns` must be a list with one pattern (or list of patterns) per block, got {block_patterns!r}."
        )
    if len(block_patterns) == 0:
        raise ValueError(
            "`block_patterns` is empty ([]): give at least one block (a pattern or a list of patterns), or None for"
            " the decoder's layers."
        )
    compiled = []
    for index, entry in enumerate(block_patterns):
        if not isinstance(entry, (str, list, tuple)) or not entry:
            raise ValueError(
                f"`block_patterns[{index}]` must be a pattern or a non-empty list of patterns, got {entry!r}."
            )
        patterns = [entry] if isinstance(entry, str) else list(entry)
        block = []
        for pattern in patterns:
            try:
                block.append(re.compile(pattern))
            except (re.error, TypeError) as error:
                raise ValueError(
                    f"`block_patterns[{index}]` holds {pattern!r}, which is not a regular expression ({error});"
                    " give a pattern or a list of patterns per block, e.g. ['layers\\.0\\.', 'layers\\.1\\.']."
                ) from None
        compiled.append(block)
    return compiled


def partition_by_patterns(model: nn.Module, block_patterns: Sequence[Union[str, Sequence[str]]]) -> BlockPartition:
    """Blocks named by regular expressions over parameter names, for models that are not HF decoders.

    Each entry is one block: a pattern or a list of patterns (``re.search``); a parameter goes to
    the first block that matches it.
    """
    names = [n for n, _ in model.named_parameters()]
    taken: set[str] = set()
    blocks = []
    for index, (entry, compiled) in enumerate(zip(block_patterns, compile_block_patterns(block_patterns))):
        patterns = [entry] if isinstance(entry, str) else list(entry)
        owned = [n for n in names if n not in taken and any(c.search(n) for c in compiled)]
        if not owned:
            raise ValueError(
                f"Block pattern {entry!r} (block {index}) matches no parameter not already in an earlier block."
                f" Parameter names look like: {names[:5]}"
            )
        taken.update(owned)
        blocks.append(Block(index=index, name="|".join(patterns), param_names=tuple(owned)))
    return BlockPartition(blocks, model)
