"""Block partitions of tiny HF decoders (built from configs, no downloads) and of plain modules."""

from __future__ import annotations

import re
from functools import lru_cache

import pytest
import torch
from lightning import LightningModule
from torch import nn

from lightning_parablock.core.blocks import (
    Block,
    BlockPartition,
    find_decoder_layers,
    partition_by_patterns,
    partition_decoder,
)

transformers = pytest.importorskip("transformers")

NUM_LAYERS = 4
ARCHS = ["llama", "qwen2", "mistral", "gemma", "gpt2"]
# Where each architecture keeps its decoder stack, and whether its LM head is tied to the embeddings.
STACK = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers", "gemma": "model.layers", "gpt2": "transformer.h"}
TIED = {"llama": False, "qwen2": False, "mistral": False, "gemma": True, "gpt2": True}


def _config(arch: str):
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=64, n_embd=16, n_layer=NUM_LAYERS, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    extra = {"head_dim": 8} if arch == "gemma" else {}
    return transformers.AutoConfig.for_model(
        arch,
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


@lru_cache(maxsize=None)
def _cached_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_config(arch))


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def model(arch: str) -> nn.Module:
    """A shared tiny model; tests that change requires_grad/grad must build their own."""
    return _cached_model(arch)


def all_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def layer_names(model: nn.Module, stack: str, layer: int) -> set[str]:
    return {n for n in all_names(model) if n.startswith(f"{stack}.{layer}.")}


def stack_names(model: nn.Module, stack: str) -> set[str]:
    return {n for n in all_names(model) if n.startswith(f"{stack}.")}


def layers_of(block: Block, stack: str) -> list[int]:
    pattern = re.compile(re.escape(stack) + r"\.(\d+)\.")
    return sorted({int(pattern.match(n).group(1)) for n in block.param_names})


def assert_disjoint(partition: BlockPartition) -> None:
    names = [n for block in partition.blocks for n in block.param_names]
    assert len(names) == len(set(names)), "a parameter is in two blocks"


# --------------------------------------------------------------------------- the decoder stack


def test_finds_the_decoder_stack(arch, model):
    name, layers = find_decoder_layers(model)
    assert name == STACK[arch]
    assert isinstance(layers, nn.ModuleList) and len(layers) == NUM_LAYERS
    assert layers is model.get_submodule(name)


def test_find_decoder_layers_errors_without_a_module_list():
    with pytest.raises(ValueError, match="block_patterns"):
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


def test_find_decoder_layers_skips_mixed_lists():
    """A ModuleList of different module types is not a decoder stack, even if it is larger."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixed = nn.ModuleList([nn.Linear(50, 50), nn.Conv1d(50, 50, 3)])
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    name, layers = find_decoder_layers(Net())
    assert name == "layers" and len(layers) == 3


# --------------------------------------------------------------------------- layers per block


@pytest.mark.parametrize("layers_per_block, expected_blocks", [(1, 4), (2, 2), (4, 1)])
def test_layers_per_block_cover_exactly_the_decoder_layers(arch, model, layers_per_block, expected_blocks):
    stack = STACK[arch]
    partition = partition_decoder(model, layers_per_block=layers_per_block)
    assert len(partition) == expected_blocks
    assert_disjoint(partition)
    covered = {n for block in partition.blocks for n in block.param_names}
    assert covered == stack_names(model, stack)
    for index, block in enumerate(partition.blocks):
        assert block.index == index
        expected_layers = list(range(index * layers_per_block, (index + 1) * layers_per_block))
        assert layers_of(block, stack) == expected_layers
        assert set(block.param_names) == set().union(*(layer_names(model, stack, i) for i in expected_layers))
    # Embeddings and head are in no block by default: they stay frozen.
    assert set(all_names(model)) - covered == {n for n in all_names(model) if not n.startswith(stack + ".")}


def test_block_names(model):
    partition = partition_decoder(model, layers_per_block=2)
    assert [b.name for b in partition.blocks] == ["layers0-1", "layers2-3"]
    assert [b.name for b in partition_decoder(model).blocks] == ["layers0", "layers1", "layers2", "layers3"]


def test_parameters_are_the_live_model_parameters(arch, model):
    partition = partition_decoder(model, layers_per_block=2)
    live = dict(model.named_parameters())
    params = partition.parameters(model, 1)
    assert list(params) == list(partition[1].param_names)
    assert all(params[n] is live[n] for n in params)
    assert partition.numel(model, 1) == sum(p.numel() for p in params.values())
    assert sum(partition.numel(model, i) for i in range(len(partition))) == sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(STACK[arch] + ".")
    )


def test_indivisible_layers_per_block_names_the_divisors(model):
    with pytest.raises(ValueError, match=r"layers_per_block=3.*4 layers.*\[1, 2, 4\]"):
        partition_decoder(model, layers_per_block=3)


@pytest.mark.parametrize("remainder, sizes", [("last_smaller", [3, 1]), ("merge_into_last", [4])])
def test_remainder_policies(arch, model, remainder, sizes):
    stack = STACK[arch]
    partition = partition_decoder(model, layers_per_block=3, remainder=remainder)
    assert [len(layers_of(b, stack)) for b in partition.blocks] == sizes
    assert_disjoint(partition)
    assert {n for b in partition.blocks for n in b.param_names} == stack_names(model, stack)


def test_unknown_remainder_policy_errors(model):
    with pytest.raises(ValueError, match="remainder.*'bogus'"):
        partition_decoder(model, layers_per_block=3, remainder="bogus")


@pytest.mark.parametrize("layers_per_block", [0, -1, NUM_LAYERS + 1])
def test_out_of_range_layers_per_block_errors(model, layers_per_block):
    with pytest.raises(ValueError, match="layers_per_block"):
        partition_decoder(model, layers_per_block=layers_per_block)


# --------------------------------------------------------------------------- attention / MLP split

ATTENTION_PARAM = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|c_attn)\.")
MLP_PARAM = re.compile(r"\.(gate_proj|up_proj|down_proj|c_fc|mlp\.c_proj)\.")


def test_attention_mlp_split_gives_two_blocks_per_layer(arch, model):
    stack = STACK[arch]
    partition = partition_decoder(model, layer_split="attention_mlp")
    assert len(partition) == 2 * NUM_LAYERS
    assert_disjoint(partition)
    for layer in range(NUM_LAYERS):
        attention, mlp = partition[2 * layer], partition[2 * layer + 1]
        assert attention.name == f"layer{layer}.attention" and mlp.name == f"layer{layer}.mlp"
        assert layers_of(attention, stack) == [layer] and layers_of(mlp, stack) == [layer]
        # The two halves cover the layer exactly.
        assert set(attention.param_names) | set(mlp.param_names) == layer_names(model, stack, layer)
        # Every attention projection is in the first half, every MLP projection in the second.
        attention_params = {n for n in layer_names(model, stack, layer) if ATTENTION_PARAM.search(n)}
        mlp_params = {n for n in layer_names(model, stack, layer) if MLP_PARAM.search(n)}
        assert attention_params and mlp_params
        assert attention_params <= set(attention.param_names)
        assert mlp_params <= set(mlp.param_names)
        assert not any(MLP_PARAM.search(n) for n in attention.param_names)
        assert not any(ATTENTION_PARAM.search(n) for n in mlp.param_names)


def test_attention_mlp_split_requires_one_layer_per_block(model):
    with pytest.raises(ValueError, match="layers_per_block` must be 1"):
        partition_decoder(model, layers_per_block=2, layer_split="attention_mlp")


def test_unknown_layer_split_errors(model):
    with pytest.raises(ValueError, match="layer_split.*'heads'"):
        partition_decoder(model, layer_split="heads")


def test_attention_mlp_split_errors_on_unsplittable_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(2))

    with pytest.raises(ValueError, match="Could not split layer 'layers.0'"):
        partition_decoder(Net(), layer_split="attention_mlp")


# --------------------------------------------------------------------------- embeddings and head


def test_include_embeddings_and_head(arch, model):
    stack = STACK[arch]
    partition = partition_decoder(model, layers_per_block=2, include_embeddings=True, include_head=True)
    assert [b.name for b in partition.blocks] == ["embeddings", "layers0-1", "layers2-3", "head"]
    assert_disjoint(partition)
    # With both extra blocks every parameter of the model is in exactly one block.
    covered = [n for b in partition.blocks for n in b.param_names]
    assert sorted(covered) == sorted(all_names(model))

    embeddings, head = set(partition[0].param_names), set(partition[-1].param_names)
    assert not any(n.startswith(stack + ".") for n in embeddings | head)
    input_embedding = model.get_input_embeddings().weight
    live = dict(model.named_parameters())
    assert any(live[n] is input_embedding for n in embeddings)
    if TIED[arch]:
        # The tied LM head is the embedding matrix: it appears once, under the embeddings.
        assert model.get_output_embeddings().weight is input_embedding
        assert not any(n.startswith("lm_head") for n in covered)
    else:
        assert "lm_head.weight" in head
    final_norm = "transformer.ln_f.weight" if arch == "gpt2" else "model.norm.weight"
    assert final_norm in head


def test_only_embeddings_or_only_head(model):
    with_embeddings = partition_decoder(model, include_embeddings=True)
    assert [b.name for b in with_embeddings.blocks][0] == "embeddings" and len(with_embeddings) == NUM_LAYERS + 1
    with_head = partition_decoder(model, include_head=True)
    assert [b.name for b in with_head.blocks][-1] == "head" and len(with_head) == NUM_LAYERS + 1
    assert [b.index for b in with_head.blocks] == list(range(NUM_LAYERS + 1))


def test_include_embeddings_or_head_errors_when_there_is_none():
    bare = nn.Module()
    bare.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(2))
    with pytest.raises(ValueError, match="include_embeddings"):
        partition_decoder(bare, include_embeddings=True)
    with pytest.raises(ValueError, match="include_head"):
        partition_decoder(bare, include_head=True)


# --------------------------------------------------------------------------- inside a LightningModule


class Wrapper(LightningModule):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


def test_partition_of_a_model_inside_a_lightning_module(arch):
    wrapped = Wrapper(transformers.AutoModelForCausalLM.from_config(_config(arch)))
    stack = "model." + STACK[arch]
    name, layers = find_decoder_layers(wrapped)
    assert name == stack and len(layers) == NUM_LAYERS
    partition = partition_decoder(wrapped, layers_per_block=2, include_embeddings=True, include_head=True)
    assert layers_of(partition[1], stack) == [0, 1] and layers_of(partition[2], stack) == [2, 3]
    assert all(n.startswith(f"{stack}.") for n in partition[1].param_names)
    assert sorted(n for b in partition.blocks for n in b.param_names) == sorted(all_names(wrapped))
    split = partition_decoder(wrapped, layer_split="attention_mlp")
    assert split[0].param_names[0].startswith(f"{stack}.0.")


# --------------------------------------------------------------------------- freezing


def test_freeze_all_but_leaves_exactly_the_block_trainable_and_clears_grads(arch):
    model = transformers.AutoModelForCausalLM.from_config(_config(arch))
    partition = partition_decoder(model, layers_per_block=2, include_embeddings=True, include_head=True)
    input_ids = torch.randint(0, 64, (2, 6))

    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())

    partition.freeze_all_but(model, 1)
    active = set(partition[1].param_names)
    for name, param in model.named_parameters():
        assert param.requires_grad == (name in active), name
        assert param.grad is None, f"stale grad left on {name}"

    # A new backward pass reaches only the active block.
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == active

    # Switching blocks moves trainability and drops the previous block's grads.
    partition.freeze_all_but(model, 2)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(partition[2].param_names)
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- explicit patterns


class PlainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(3, 4)
        self.hidden = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.decoder = nn.Linear(4, 2)


def test_partition_by_patterns_on_a_plain_module():
    net = PlainNet()
    partition = partition_by_patterns(net, [r"^encoder\.", [r"^hidden\.0\.", r"^hidden\.2\."], r"^decoder\."])
    assert len(partition) == 3
    assert partition[0].param_names == ("encoder.weight", "encoder.bias")
    assert set(partition[1].param_names) == {"hidden.0.weight", "hidden.0.bias", "hidden.2.weight", "hidden.2.bias"}
    assert partition[1].name == r"^hidden\.0\.|^hidden\.2\."
    assert partition[2].param_names == ("decoder.weight", "decoder.bias")
    assert sorted(n for b in partition.blocks for n in b.param_names) == sorted(all_names(net))


def test_partition_by_patterns_gives_a_parameter_to_the_first_matching_block():
    partition = partition_by_patterns(PlainNet(), [r"weight", r"bias"])
    assert all(n.endswith("weight") for n in partition[0].param_names)
    assert all(n.endswith("bias") for n in partition[1].param_names)
    assert_disjoint(partition)
    # Parameters matched by no pattern stay out of every block.
    assert set(partition_by_patterns(PlainNet(), [r"^encoder"])[0].param_names) == {"encoder.weight", "encoder.bias"}


def test_partition_by_patterns_errors_for_a_pattern_matching_nothing():
    with pytest.raises(ValueError, match=r"'\^attention' \(block 1\) matches no parameter.*encoder.weight"):
        partition_by_patterns(PlainNet(), [r"^encoder", r"^attention"])


def test_partition_by_patterns_errors_when_a_block_is_wholly_inside_an_earlier_one():
    with pytest.raises(ValueError, match=r"block 1.*already in an earlier block"):
        partition_by_patterns(PlainNet(), [r"^hidden", r"^hidden\.0\."])


def test_partition_by_patterns_errors_when_empty():
    with pytest.raises(ValueError, match="block_patterns"):
        partition_by_patterns(PlainNet(), [])


def test_block_partition_rejects_overlapping_unknown_and_empty_blocks():
    net = PlainNet()
    with pytest.raises(ValueError, match=r"'encoder.weight' is in both block 'a' and block 'b'"):
        BlockPartition([Block(0, "a", ("encoder.weight",)), Block(1, "b", ("encoder.weight", "encoder.bias"))], net)
    with pytest.raises(ValueError, match=r"'nope.weight', which is not a parameter"):
        BlockPartition([Block(0, "a", ("nope.weight",))], net)
    with pytest.raises(ValueError, match=r"Block 'a' owns no parameters"):
        BlockPartition([Block(0, "a", ())], net)
    with pytest.raises(ValueError, match="at least one block"):
        BlockPartition([], net)
