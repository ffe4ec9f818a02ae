"""Packing: several examples per row, each trained as if alone (same per-example losses), each client's shard
packed on its own; how each model keeps packed examples apart is measured on it, and packing is refused where
nothing does."""

import importlib.util
import json

import pytest
import torch
from helpers import quiet_trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning import Callback
from pretrained import TINY_LLAMA, chat_tokenizer

from lightning_parablock.data import CHAR_VOCAB_SIZE, IGNORE_INDEX, FederatedDataModule, SFTCollator
from lightning_parablock.data.packing import PackedCollator, pack_lengths, packed_attention_mask
from lightning_parablock.module import CausalLMModule

SMALL = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_OPT = {"model_type": "opt", **SMALL, "ffn_dim": 64, "word_embed_proj_dim": 32, "max_position_embeddings": 256}
"""OPT builds its causal mask without the position ids, so packed rows need the 4D mask (measured)."""
TINY_BLOOM = {"model_type": "bloom", **SMALL, "pad_token_id": 0}
"""Bloom (eager only) neither detects packing from position ids nor takes a 4D mask (measured): refused."""


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 16), min_size=1, max_size=40), st.integers(16, 40))
def test_rows_hold_every_example_once_and_never_exceed_max_length(lengths, max_length):
    rows = pack_lengths(lengths, max_length)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max_length for row in rows)


def test_an_example_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="Example 1 has 9 tokens, more than max_length=8"):
        pack_lengths([3, 9], 8)


def per_token_losses(model, batch):
    logits = model(**batch).logits.float()
    labels = batch["labels"]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses, labels[:, 1:] != IGNORE_INDEX


@pytest.mark.parametrize("config, path", [(TINY_LLAMA, "position_ids"), (TINY_OPT, "mask")], ids=["llama", "opt"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_packed_row_gives_each_example_the_loss_it_has_alone(config, path, attn_implementation):
    torch.manual_seed(0)
    model = CausalLMModule(config=config, attn_implementation=attn_implementation).eval()
    examples = []
    for length, prompt in ((7, 3), (12, 5), (4, 1)):
        ids = torch.randint(4, 100, (length,)).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        examples.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    with torch.no_grad():
        alone = []
        for example in examples:
            losses, supervised = per_token_losses(model, SFTCollator(0)([example]))
            alone.append(losses[supervised].sum())
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for example in examples:
            row["input_ids"] += example["input_ids"]
            row["labels"] += [IGNORE_INDEX, *example["labels"][1:]]
            row["position_ids"] += range(len(example["input_ids"]))
        batch = PackedCollator(0)([row, {k: v[:7] for k, v in row.items()}])  # a second, shorter row: padding
        assert "attention_mask" not in batch
        losses, supervised = per_token_losses(model, batch)
        unmasked, _ = per_token_losses(model.model, {**batch, "use_cache": False})  # as the collator feeds it
    assert model.packed_attention == path  # measured on the first packed batch, no Trainer needed
    starts = [0, 7, 19, 23]
    for index, expected in enumerate(alone):
        span = slice(starts[index], starts[index + 1] - 1)  # the shifted losses of this example's tokens
        torch.testing.assert_close(losses[0, span][supervised[0, span]].sum(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[1, :6][supervised[1, :6]].sum(), alone[0], rtol=1e-5, atol=1e-5)
    assert supervised[0].sum() == sum((torch.tensor(e["labels"][1:]) != IGNORE_INDEX).sum() for e in examples)
    leaked = (unmasked[0, 7:] - losses[0, 7:]).abs().max()
    assert (leaked == 0) == (path == "position_ids")  # OPT without the mask: later examples see earlier ones


def test_the_packed_mask_is_causal_within_each_sequence_and_padding_is_one_of_its_own():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])  # examples of 3 and 2 tokens, one padding token
    allowed = packed_attention_mask(position_ids, torch.float32)[0, 0] == 0
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for start, end in ((0, 3), (3, 5), (5, 6)):
        expected[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    assert torch.equal(allowed, expected)
    assert packed_attention_mask(position_ids, torch.bfloat16).min() == torch.finfo(torch.bfloat16).min


def test_packing_is_refused_by_name_on_a_model_where_examples_would_see_each_other():
    model = CausalLMModule(config=TINY_BLOOM, attn_implementation="eager")
    batch = PackedCollator(0)(
        [{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "position_ids": [0, 1, 2, 0, 1]}]
    )
    with pytest.raises(ValueError, match=r"apart in BloomForCausalLM: .* differ by .* `packing=False`"):
        model(**batch)
    assert model.packed_attention is None
    model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]))  # unpacked: fine


def test_the_probe_draws_no_random_numbers_and_restores_every_train_flag():
    model = CausalLMModule(config=TINY_OPT).train()
    model.model.model.decoder.layers[0].eval()  # a submodule someone put in eval mode stays there
    modes = [m.training for m in model.modules()]
    rng = torch.random.get_rng_state()
    assert model.check_packing() == "mask"
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes


class CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps += 1


@pytest.mark.parametrize("config, path", [(TINY_LLAMA, "position_ids"), (TINY_BLOOM, None)], ids=["llama", "bloom"])
def test_fit_with_a_packing_datamodule_checks_the_model_before_the_first_step(config, path, tmp_path):
    rows = [{"instruction": "q" * (i % 7 + 1), "output": "a" * (i % 5 + 1)} for i in range(8)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = FederatedDataModule(
        dataset={"data_files": str(tmp_path / "data.jsonl")}, tokenizer=chat_tokenizer(),
        prompt_format="question_answer", max_length=64, packing=True, batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    module = CausalLMModule(config={**config, "vocab_size": CHAR_VOCAB_SIZE}, attn_implementation="eager")
    steps = CountSteps()
    trainer = quiet_trainer(max_steps=1, callbacks=[steps])
    if path is None:
        with pytest.raises(ValueError, match="BloomForCausalLM.*`packing=False`"):
            trainer.fit(module, datamodule=data)
        assert steps.steps == 0
    else:
        trainer.fit(module, datamodule=data)
        assert module.packed_attention == path and steps.steps == 1


def test_each_clients_shard_is_packed_on_its_own(tmp_path):
    rows = [{"instruction": "q" * (i % 7 + 1), "output": "a" * (i % 5 + 1), "topic": i % 3} for i in range(30)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = FederatedDataModule(
        dataset={"data_files": str(path)}, tokenizer=chat_tokenizer(), prompt_format="question_answer",
        max_length=64, packing=True, batch_size=2, partition="dirichlet", label_column="topic", alpha=0.5,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    data.setup()
    examples = data._untokenized_parts(3)
    shards = data.client_partition(3)
    packed = data.packed_train
    assert sorted(r for shard in shards for r in shard) == list(range(len(packed)))
    for client, shard in enumerate(shards):
        held = sorted(i for r in shard for i in packed.rows[r])
        assert held == sorted(examples[client])  # no row mixes two clients' examples
    assert len(packed) < len(data.train_dataset)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape[1] <= 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attn_implementation", ["sdpa", "flash_attention_2"])
def test_on_a_gpu_in_bf16_packed_rows_keep_each_examples_loss(attn_implementation):
    # flash-attention's variable-length kernel is the position-id path on a GPU; SDPA gets a block-diagonal mask.
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    torch.manual_seed(0)
    module = CausalLMModule(config=TINY_LLAMA, attn_implementation=attn_implementation, dtype="bfloat16")
    module.configure_model()
    module = module.to("cuda").eval()
    lengths = (7, 12, 4)
    examples = [torch.randint(4, 100, (n,), device="cuda") for n in lengths]
    with torch.no_grad():
        alone = [module(input_ids=e[None], labels=e[None]).loss for e in examples]
        position_ids = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
        row = torch.cat(examples)[None]
        logits = module(input_ids=row, position_ids=position_ids).logits.float()
    assert module.packed_attention == "position_ids"
    start = 0
    for example, expected in zip(examples, alone):
        span = logits[0, start : start + len(example) - 1]
        loss = torch.nn.functional.cross_entropy(span, example[1:])
        torch.testing.assert_close(loss, expected.float(), rtol=2e-2, atol=2e-2)
        start += len(example)
