"""Packing: several examples per row, each trained as if alone (same per-example losses), each client's shard
packed on its own."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pretrained import TINY_LLAMA, chat_tokenizer

from lightning_parablock.data import IGNORE_INDEX, FederatedDataModule, SFTCollator
from lightning_parablock.data.packing import PackedCollator, pack_lengths
from lightning_parablock.module import CausalLMModule


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


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_packed_row_gives_each_example_the_loss_it_has_alone(attn_implementation):
    torch.manual_seed(0)
    model = CausalLMModule(config=TINY_LLAMA, attn_implementation=attn_implementation).eval()
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
    starts = [0, 7, 19, 23]
    for index, expected in enumerate(alone):
        span = slice(starts[index], starts[index + 1] - 1)  # the shifted losses of this example's tokens
        torch.testing.assert_close(losses[0, span][supervised[0, span]].sum(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[1, :6][supervised[1, :6]].sum(), alone[0], rtol=1e-5, atol=1e-5)
    assert supervised[0].sum() == sum((torch.tensor(e["labels"][1:]) != IGNORE_INDEX).sum() for e in examples)


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
