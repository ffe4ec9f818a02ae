import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_parablock.data import (
    CHAR_VOCAB_SIZE,
    IGNORE_INDEX,
    SFTCollator,
    SyntheticArithmeticDataModule,
    build_char_tokenizer,
    dirichlet_partition,
    format_prompt,
    iid_partition,
    label_histogram,
    make_arithmetic_dataset,
    tokenize_for_sft,
)
from lightning_parablock.data.partition import apportion
from lightning_parablock.data.synthetic import PROBLEM_KINDS


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _assert_covers_once(partition: list[list[int]], num_examples: int) -> None:
    flat = [index for part in partition for index in part]
    assert sorted(flat) == list(range(num_examples))


# --- synthetic dataset ----------------------------------------------------------------------------------------


def test_dataset_is_deterministic_and_has_every_source():
    first, second = make_arithmetic_dataset(300, seed=1), make_arithmetic_dataset(300, seed=1)
    assert first.column_names == ["source", "instruction", "output"]
    assert first.to_dict() == second.to_dict()
    assert first.to_dict() != make_arithmetic_dataset(300, seed=2).to_dict()
    assert set(first["source"]) == set(PROBLEM_KINDS)


def test_dataset_answers_are_correct():
    for row in make_arithmetic_dataset(200, seed=0):
        question = row["instruction"]
        if row["source"] in ("addition", "subtraction", "multiplication"):
            expression = question.removeprefix("What is ").removesuffix("?")
            assert str(eval(expression)) == row["output"]
        elif row["source"] == "comparison":
            a, b = question.removeprefix("Which is larger, ").removesuffix("?").split(" or ")
            assert row["output"] == str(max(int(a), int(b)))
        else:
            number = int(question.split()[1])
            assert row["output"] == ("odd" if number % 2 else "even")


def test_dataset_rejects_negative_size():
    with pytest.raises(ValueError, match="num_examples.*-1"):
        make_arithmetic_dataset(-1, seed=0)


# --- tokenizer ------------------------------------------------------------------------------------------------


def test_tokenizer_digits_are_single_tokens_and_roundtrip(tokenizer):
    assert len(tokenizer) == CHAR_VOCAB_SIZE < 128
    digit_ids = tokenizer.encode("0123456789", add_special_tokens=False)
    assert len(digit_ids) == 10 and len(set(digit_ids)) == 10
    text = "What is 23 + 45? 68 even, odd."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_tokenizer_special_tokens_and_determinism(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.encode("é", add_special_tokens=False) == [tokenizer.unk_token_id]
    assert build_char_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_tokenizer_compresses_alpaca_template(tokenizer):
    prompt = format_prompt("What is 1 + 2?")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert len(ids) < 30
    assert tokenizer.decode(ids) == prompt


def test_tokenizer_save_and_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = format_prompt("Is 7 even or odd?") + "odd"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.eos_token_id == tokenizer.eos_token_id


# --- formatting -----------------------------------------------------------------------------------------------


def test_format_prompt_alpaca_wording():
    assert format_prompt("Add.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd.\n\n### Response:\n"
    )
    assert format_prompt("Add.", "1 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n"
    )
    assert format_prompt("Add.", "") == format_prompt("Add.")


def test_tokenize_for_sft_masks_exactly_the_prompt(tokenizer):
    prompt = format_prompt("What is 23 + 45?")
    out = tokenize_for_sft(prompt, "68", tokenizer, max_length=64)
    num_prompt = 1 + len(tokenizer.encode(prompt, add_special_tokens=False))
    response_ids = tokenizer.encode("68", add_special_tokens=False) + [tokenizer.eos_token_id]

    assert out["input_ids"][0] == tokenizer.bos_token_id
    assert len(out["input_ids"]) == len(out["labels"]) == len(out["attention_mask"]) == num_prompt + 3
    assert out["labels"][:num_prompt] == [IGNORE_INDEX] * num_prompt
    assert out["labels"][num_prompt:] == out["input_ids"][num_prompt:] == response_ids
    assert out["attention_mask"] == [1] * len(out["input_ids"])


def test_tokenize_for_sft_truncates_from_the_right(tokenizer):
    prompt = format_prompt("What is 23 + 45?")
    full = tokenize_for_sft(prompt, "68", tokenizer, max_length=64)
    cut = tokenize_for_sft(prompt, "68", tokenizer, max_length=len(full["input_ids"]) - 1)
    assert cut["input_ids"] == full["input_ids"][:-1]
    assert cut["labels"] == full["labels"][:-1]
    with pytest.raises(ValueError, match="max_length.*0"):
        tokenize_for_sft(prompt, "68", tokenizer, max_length=0)


def test_sft_loss_ignores_prompt_tokens(tokenizer):
    """Only response positions contribute: changing the logits at prompt positions leaves the loss unchanged."""
    out = tokenize_for_sft(format_prompt("What is 2 * 3?"), "6", tokenizer, max_length=64)
    labels = torch.tensor(out["labels"])
    logits = torch.randn(len(labels), len(tokenizer))
    # HF causal LMs predict token t+1 from position t.
    loss = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX)
    num_prompt = int((labels == IGNORE_INDEX).sum())
    perturbed = logits.clone()
    perturbed[: num_prompt - 1] += torch.randn_like(perturbed[: num_prompt - 1])
    perturbed_loss = torch.nn.functional.cross_entropy(perturbed[:-1], labels[1:], ignore_index=IGNORE_INDEX)
    assert torch.equal(loss, perturbed_loss)


def test_collator_right_pads():
    collate = SFTCollator(pad_token_id=0)
    batch = collate(
        [
            {"input_ids": [1, 5, 6], "attention_mask": [1, 1, 1], "labels": [-100, 6, 2]},
            {"input_ids": [1, 7], "attention_mask": [1, 1], "labels": [-100, 2]},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 2], [-100, 2, -100]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    with pytest.raises(ValueError, match="empty"):
        collate([])


# --- partitions -----------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(num_examples=st.integers(1, 200), num_clients=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_iid_partition_properties(num_examples, num_clients, seed):
    if num_clients > num_examples:
        with pytest.raises(ValueError, match=f"num_clients={num_clients}"):
            iid_partition(num_examples, num_clients, seed)
        return
    partition = iid_partition(num_examples, num_clients, seed)
    assert len(partition) == num_clients
    _assert_covers_once(partition, num_examples)
    sizes = [len(part) for part in partition]
    assert max(sizes) - min(sizes) <= 1
    assert partition == iid_partition(num_examples, num_clients, seed)


@settings(max_examples=50, deadline=None)
@given(
    labels=st.lists(st.sampled_from("abcde"), min_size=20, max_size=200),
    num_clients=st.integers(1, 5),
    alpha=st.floats(0.3, 100.0),
    seed=st.integers(0, 2**16),
)
def test_dirichlet_partition_properties(labels, num_clients, alpha, seed):
    partition = dirichlet_partition(labels, num_clients, alpha, seed)
    assert len(partition) == num_clients
    assert min(len(part) for part in partition) >= 1
    _assert_covers_once(partition, len(labels))
    assert partition == dirichlet_partition(labels, num_clients, alpha, seed)


@settings(max_examples=100, deadline=None)
@given(
    total=st.integers(0, 500),
    proportions=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20).filter(lambda p: sum(p) > 1e-6),
    seed=st.integers(0, 2**16),
)
def test_apportion_rounds_every_share_to_a_neighbouring_whole_count(total, proportions, seed):
    counts = apportion(total, np.array(proportions), np.random.default_rng(seed))
    shares = total * np.array(proportions) / sum(proportions)
    assert counts.sum() == total and (counts >= 0).all()
    assert (np.abs(counts - shares) < 1 + 1e-9).all()


def test_apportion_gives_tied_leftovers_to_every_client_alike():
    received = np.zeros(10)
    for seed in range(2000):
        received += apportion(23, np.full(10, 0.1), np.random.default_rng(seed)) - 2  # 3 leftovers among 10 ties
    assert received.sum() == 3 * 2000
    assert (np.abs(received / 2000 - 0.3) < 0.05).all()


def test_dirichlet_leftovers_do_not_pile_up_on_the_last_client():
    """Rounding each label's shares down and giving the rest to the last client handed it one example of nearly
    every label (39 of 40 here); fair rounding gives it as many labels as any other client."""
    labels = [label for label in range(40) for _ in range(5)]
    held = np.zeros(10)
    for seed in range(20):
        partition = dirichlet_partition(labels, num_clients=10, alpha=0.1, seed=seed, min_size=0)
        held += [len({labels[index] for index in part}) for part in partition]
    assert held[-1] <= 1.5 * held[:-1].mean()
    assert held.max() <= 1.5 * held.min()


def _mean_dominant_share(partition: list[list[int]], labels: list[str]) -> float:
    histograms = label_histogram(partition, labels)
    return sum(max(h.values()) / sum(h.values()) for h in histograms) / len(histograms)


def test_dirichlet_small_alpha_concentrates_labels():
    labels = [kind for kind in "abcde" for _ in range(200)]
    skewed = dirichlet_partition(labels, num_clients=10, alpha=0.1, seed=0)
    uniform = dirichlet_partition(labels, num_clients=10, alpha=100.0, seed=0)
    assert _mean_dominant_share(skewed, labels) > 0.6
    assert _mean_dominant_share(uniform, labels) < 0.35


def test_label_histogram_counts():
    labels = ["a", "b", "a", "c"]
    assert label_histogram([[0, 2], [1, 3]], labels) == [{"a": 2}, {"b": 1, "c": 1}]


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_rejects_non_positive_alpha(alpha):
    with pytest.raises(ValueError, match=f"alpha.*positive.*{alpha}"):
        dirichlet_partition(["a", "b"], num_clients=1, alpha=alpha, seed=0)


@pytest.mark.parametrize("num_clients", [0, -3])
def test_partitions_reject_non_positive_num_clients(num_clients):
    with pytest.raises(ValueError, match=f"num_clients.*positive.*{num_clients}"):
        iid_partition(10, num_clients, seed=0)
    with pytest.raises(ValueError, match=f"num_clients.*positive.*{num_clients}"):
        dirichlet_partition(["a"] * 10, num_clients, alpha=1.0, seed=0)


def test_partitions_reject_more_clients_than_examples():
    with pytest.raises(ValueError, match="num_clients=4.*3 examples.*at most 3"):
        iid_partition(3, 4, seed=0)
    with pytest.raises(ValueError, match="num_clients=4.*3 examples.*at most 3"):
        dirichlet_partition(["a", "b", "c"], 4, alpha=1.0, seed=0)


def test_dirichlet_gives_up_with_advice():
    labels = ["a"] * 5 + ["b"] * 5
    with pytest.raises(ValueError, match="num_clients=5.*min_size=2.*alpha=0.01.*Increase `alpha`"):
        dirichlet_partition(labels, num_clients=5, alpha=0.01, seed=0, min_size=2)


# --- datamodule -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_datamodule_end_to_end(partition):
    dm = SyntheticArithmeticDataModule(num_examples=120, val_examples=16, batch_size=4, partition=partition, seed=3)
    dm.setup("fit")
    train_dataset = dm.train_dataset
    dm.setup("fit")
    assert dm.train_dataset is train_dataset
    assert dm.num_samples == 120 and len(dm.val_dataset) == 16

    clients = dm.client_partition(4)
    assert len(clients) == 4
    _assert_covers_once(clients, dm.num_samples)
    assert clients == dm.client_partition(4)

    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= dm.hparams.max_length
    padding = batch["attention_mask"] == 0
    assert torch.all(batch["input_ids"][padding] == dm.tokenizer.pad_token_id)
    assert torch.all(batch["labels"][padding] == IGNORE_INDEX)
    assert torch.all((batch["labels"] != IGNORE_INDEX).sum(dim=1) >= 2)  # at least one answer token and eos
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[0] == 4


def test_datamodule_dirichlet_splits_by_source():
    dm = SyntheticArithmeticDataModule(num_examples=500, val_examples=0, alpha=0.05, seed=0)
    clients = dm.client_partition(5)
    sources = make_arithmetic_dataset(500, seed=0)["source"]
    assert _mean_dominant_share(clients, list(sources)) > 0.6


def test_datamodule_rejects_unknown_partition():
    with pytest.raises(ValueError, match="partition.*'iid' or 'dirichlet'.*'shards'"):
        SyntheticArithmeticDataModule(partition="shards")


def test_datamodule_rejects_truncating_max_length():
    dm = SyntheticArithmeticDataModule(num_examples=20, val_examples=0, max_length=20)
    with pytest.raises(ValueError, match="max_length=20"):
        dm.setup("fit")


def test_a_tokenizer_without_bos_gets_none_prepended_like_qwen():
    from lightning_parablock.data.formatting import encode_for_sft

    tokenizer = build_char_tokenizer()
    tokenizer.bos_token = None
    features = encode_for_sft("Q?", "42", tokenizer)
    assert features["input_ids"][0] == tokenizer.convert_tokens_to_ids("Q")
    assert features["labels"] == [-100, -100, *tokenizer.encode("42", add_special_tokens=False), tokenizer.eos_token_id]


def test_a_task_of_chosen_kinds_draws_only_those_and_leaves_the_default_task_as_it_was():
    assert make_arithmetic_dataset(300, seed=1).to_dict() == make_arithmetic_dataset(300, 1, tuple(PROBLEM_KINDS)).to_dict()
    unseen = ("multiplication", "minimum", "doubling", "remainder")
    data = SyntheticArithmeticDataModule(num_examples=200, val_examples=20, seed=0, kinds=unseen)
    data.setup()
    assert set(data._train_sources) == set(unseen)
    rows = make_arithmetic_dataset(200, 0, ("minimum", "doubling", "remainder"))
    for row in rows:
        numbers = [int(n) for n in row["instruction"].rstrip("?").replace(",", "").split() if n.isdigit()]
        expected = {"minimum": lambda: min(numbers), "doubling": lambda: 2 * numbers[0],
                    "remainder": lambda: numbers[0] % numbers[1]}[row["source"]]()  # fmt: skip
        assert row["output"] == str(expected), row
    for bad in ([], ["addition", "addition"], ["division"], "addition"):
        with pytest.raises(ValueError, match=r"`kinds` must be distinct names from \['addition'"):
            SyntheticArithmeticDataModule(kinds=bad)
