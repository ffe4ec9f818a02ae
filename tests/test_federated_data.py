"""FederatedDataModule and its rooms: loading every schema, prompt masking, partitions, the split's picture."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset
from helpers import quiet_trainer

from lightning_parablock import CausalLMModule, FederatedBlockStrategy, ParaBlockCallback
from lightning_parablock.data import (
    IGNORE_INDEX,
    PRESETS,
    DataSource,
    FederatedDataModule,
    build_char_tokenizer,
    cluster_labels,
    dirichlet_partition,
    format_partition_table,
    format_prompt,
    label_histogram,
    load_examples,
    loading,
    natural_partition,
    partition_with_flwr,
    plot_partition,
    tokenize_dataset,
)

FIXTURES = Path(__file__).parent / "fixtures"
ALPACA = str(FIXTURES / "alpaca_gpt4.json")
MATH = str(FIXTURES / "mathinstruct.jsonl")
GSM8K = str(FIXTURES / "gsm8k_test.parquet")
CSV = str(FIXTURES / "qa.csv")
CSV_COLUMNS = {"instruction": "prompt", "input": "context", "output": "response"}
CHAT_TEMPLATE = (
    "<s>{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("char_tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("datasets_cache"))


def datamodule(tokenizer_dir, cache_dir, data_files=MATH, **kwargs) -> FederatedDataModule:
    options = dict(max_length=128, batch_size=4, label_column="source", cache_dir=cache_dir)
    options.update(kwargs)
    return FederatedDataModule(DataSource(data_files=data_files), tokenizer=tokenizer_dir, **options)


def _assert_covers_once(partition, num_examples):
    assert sorted(index for part in partition for index in part) == list(range(num_examples))


# --- loading ----------------------------------------------------------------------------------------------------


def test_alpaca_json_loads_in_the_common_schema(cache_dir):
    rows = load_examples(DataSource(data_files=ALPACA), seed=0, cache_dir=cache_dir)
    raw = json.loads(Path(ALPACA).read_text())
    assert len(rows) == len(raw) and {"instruction", "input", "output"} <= set(rows.column_names)
    assert rows[0] == raw[0]
    assert any(row["input"] for row in rows)  # Alpaca keeps its input field where there is one


def test_mathinstruct_jsonl_keeps_its_source_column_and_gets_an_empty_input(cache_dir):
    rows = load_examples(DataSource(data_files=MATH), seed=0, cache_dir=cache_dir)
    assert set(rows.column_names) == {"source", "instruction", "output", "input"}
    assert set(rows["input"]) == {""}
    assert len(set(rows["source"])) == 6


def test_gsm8k_parquet_maps_question_and_answer(cache_dir):
    source = DataSource(
        path="parquet", data_files={"test": GSM8K}, split="test", columns=PRESETS["openai/gsm8k"].columns
    )
    rows = load_examples(source, seed=0, cache_dir=cache_dir)
    assert "question" not in rows.column_names and "answer" not in rows.column_names
    assert rows[0]["instruction"].startswith("A box holds") and "\n#### " in rows[0]["output"]


def test_csv_with_a_column_mapping(cache_dir):
    rows = load_examples(DataSource(data_files=CSV, columns=CSV_COLUMNS), seed=0, cache_dir=cache_dir)
    assert rows[0]["instruction"].endswith("?") and rows[0]["input"].startswith("city: ")
    assert "topic" in rows.column_names
    explicit = load_examples(DataSource(path="csv", data_files=CSV, columns=CSV_COLUMNS), seed=0, cache_dir=cache_dir)
    assert explicit["instruction"] == rows["instruction"]


@pytest.mark.parametrize(("path", "files", "named"), [("json", CSV, "csv"), ("csv", [ALPACA], "json")])
def test_a_builder_the_files_extension_contradicts_is_refused_naming_both(path, files, named, cache_dir):
    with pytest.raises(ValueError, match=rf"`path='{path}'` reads {path} files, but .* is a {named} file .* `path: {named}`"):
        load_examples(DataSource(path=path, data_files=files), seed=0, cache_dir=cache_dir)


@pytest.mark.parametrize(
    ("path", "config", "fixture"),
    [("vicgalle/alpaca-gpt4", None, ALPACA), ("TIGER-Lab/MathInstruct", None, MATH), ("openai/gsm8k", "main", GSM8K)],
)
def test_hub_presets_load_with_the_right_configuration_and_columns(monkeypatch, path, config, fixture):
    """The Hub is out of reach in tests: `load_dataset` is replaced by the fixture of the same schema."""
    calls = []

    def fake_load_dataset(name, config_name, split, data_files, cache_dir):
        calls.append((name, config_name, split, data_files))
        frame = (
            pd.read_parquet(fixture)
            if fixture.endswith("parquet")
            else pd.read_json(fixture, lines=fixture.endswith(".jsonl"))
        )
        return Dataset.from_pandas(frame)

    monkeypatch.setattr(loading, "load_dataset", fake_load_dataset)
    rows = load_examples(DataSource(path=path, split="test"), seed=0)
    assert calls == [(path, config, "test", None)]
    assert {"instruction", "input", "output"} <= set(rows.column_names)
    assert all(rows["instruction"]) and all(rows["output"])


def test_max_examples_is_a_seeded_sample(cache_dir):
    def sample(seed):
        return load_examples(DataSource(data_files=MATH, max_examples=40), seed=seed, cache_dir=cache_dir)

    assert len(sample(0)) == 40
    assert sample(0)["instruction"] == sample(0)["instruction"] != sample(1)["instruction"]
    assert len(load_examples(DataSource(data_files=MATH, max_examples=10_000), seed=0, cache_dir=cache_dir)) == 150


def test_missing_column_names_it_and_the_columns_there(cache_dir):
    with pytest.raises(ValueError, match=r"no column 'question' for the 'instruction' field; its columns are \["):
        load_examples(DataSource(data_files=MATH, columns={"instruction": "question"}), seed=0, cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['label'\].*label_column"):
        load_examples(DataSource(data_files=MATH, columns={"label": "source"}), seed=0, cache_dir=cache_dir)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("null.jsonl", '{"instruction": "q0", "output": "a0"}\n{"instruction": "q1", "output": null}\n', r"null 'output' \(the 'output' field\) in row 1"),
        ("null.csv", "prompt,response\nq0,a0\nq1,a1\n,a2\n", r"null 'prompt' \(the 'instruction' field\) in row 2"),
    ],
)  # fmt: skip
def test_a_null_instruction_or_output_is_refused_naming_its_row(tmp_path, cache_dir, name, text, message):
    (tmp_path / name).write_text(text)
    columns = {"instruction": "prompt", "output": "response"} if name.endswith(".csv") else None
    with pytest.raises(ValueError, match=message):
        load_examples(DataSource(data_files=str(tmp_path / name), columns=columns), seed=0, cache_dir=cache_dir)


def test_unknown_file_type_and_no_source_are_refused():
    with pytest.raises(
        ValueError, match=r"data_files='notes.txt'.*\['.txt'\].*\['.csv', '.json', '.jsonl', '.parquet'\]"
    ):
        load_examples(DataSource(data_files="notes.txt"), seed=0)
    with pytest.raises(ValueError, match="needs a `path`.*or `data_files`"):
        load_examples(DataSource(), seed=0)
    with pytest.raises(ValueError, match="max_examples.*0"):
        load_examples(DataSource(data_files=MATH, max_examples=0), seed=0)


# --- prompt masking and tokenization ---------------------------------------------------------------------------


def _supervised_ids(features):
    return [token for token, label in zip(features["input_ids"], features["labels"]) if label != IGNORE_INDEX]


def test_alpaca_format_masks_every_prompt_token(tokenizer, cache_dir):
    rows = load_examples(DataSource(data_files=ALPACA), seed=0, cache_dir=cache_dir)
    tokenized, report = tokenize_dataset(rows, tokenizer, max_length=512)
    assert report.truncated == report.dropped == 0 and len(tokenized) == len(rows)
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels"]
    for row, features in zip(rows, tokenized):
        expected = tokenizer.encode(row["output"], add_special_tokens=False) + [tokenizer.eos_token_id]
        assert _supervised_ids(features) == expected
        num_prompt = len(features["labels"]) - len(expected)
        assert features["labels"][:num_prompt] == [IGNORE_INDEX] * num_prompt
        assert features["input_ids"][0] == tokenizer.bos_token_id


@pytest.mark.parametrize("prompt_format", ["chat", "auto"])
def test_chat_template_masks_the_conversation_up_to_the_answer(prompt_format):
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    rows = Dataset.from_dict({"instruction": ["Add 2 and 3."], "input": ["quickly"], "output": ["5"]})
    tokenized, _ = tokenize_dataset(rows, tokenizer, max_length=128, prompt_format=prompt_format)
    features = tokenized[0]
    assert tokenizer.decode(features["input_ids"]) == "<s>[user] Add 2 and 3.\n\nquickly</s>[assistant] 5</s>"
    assert _supervised_ids(features) == tokenizer.encode("5", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert features["input_ids"].count(tokenizer.bos_token_id) == 1  # the template's own, none added


def test_chat_format_needs_a_template_and_auto_falls_back_to_alpaca_lora(tokenizer):
    rows = Dataset.from_dict({"instruction": ["Add 2 and 3."], "input": [""], "output": ["5"]})
    with pytest.raises(ValueError, match="prompt_format='chat'.*chat template.*'alpaca_lora'"):
        tokenize_dataset(rows, tokenizer, max_length=128, prompt_format="chat")
    with pytest.raises(ValueError, match="prompt_format.*'alpaca_lora', 'question_answer', 'chat', 'auto'.*'vicuna'"):
        tokenize_dataset(rows, tokenizer, max_length=128, prompt_format="vicuna")
    auto, _ = tokenize_dataset(rows, tokenizer, max_length=128, prompt_format="auto")
    alpaca, _ = tokenize_dataset(rows, tokenizer, max_length=128, prompt_format="alpaca_lora")
    assert auto[0] == alpaca[0]


def test_the_old_alpaca_name_is_refused_naming_both_templates(tokenizer):
    with pytest.raises(ValueError, match="'alpaca'.*no longer accepted.*'alpaca_lora'.*'stanford_alpaca'"):
        FederatedDataModule(DataSource(data_files=ALPACA), tokenizer, prompt_format="alpaca")


@pytest.mark.parametrize(
    ("prompt_format", "between"),
    [("stanford_alpaca", "### Response:"), ("alpaca_lora", "### Response:\n"), ("question_answer", "Answer: ")],
)
def test_each_plain_format_trains_on_the_response_right_after_its_prompt(tokenizer, prompt_format, between):
    rows = Dataset.from_dict({"instruction": ["Add 2 and 3."], "input": [""], "output": ["5"]})
    [features], _ = tokenize_dataset(rows, tokenizer, max_length=256, prompt_format=prompt_format)
    text = tokenizer.decode(features["input_ids"])
    prompt = format_prompt("Add 2 and 3.", prompt_format=prompt_format)
    assert text.startswith(f"<s>{prompt}") and text.endswith(f"{between}5</s>")
    assert _supervised_ids(features) == tokenizer.encode(text[len(f"<s>{prompt}") :], add_special_tokens=False)


def test_truncation_is_counted_and_prompt_only_examples_dropped(tokenizer):
    rows = Dataset.from_dict(
        {
            "instruction": ["Hi.", "Hi.", "A much longer instruction " * 4],
            "input": ["", "", ""],
            "output": ["a", "b" * 50, "c"],
        }
    )
    lengths = [len(tokenize_dataset(rows.select([i]), tokenizer, max_length=1000)[0][0]["input_ids"]) for i in range(3)]
    max_length = lengths[0] + 1  # the first fits; the second's answer is cut; the third's prompt fills it
    tokenized, report = tokenize_dataset(rows, tokenizer, max_length=max_length, split="train")
    assert (report.examples, report.truncated, report.dropped, report.kept) == (3, 2, 1, [0, 1])
    assert len(tokenized) == 2 and all(len(f["input_ids"]) <= max_length for f in tokenized)
    assert report.format() == (
        f"train: 3 examples, 2 truncated to max_length={max_length}, 1 dropped (the prompt alone fills max_length)"
    )


def test_tokenized_files_are_cached_by_datasets(tokenizer, cache_dir):
    rows = load_examples(DataSource(data_files=MATH), seed=0, cache_dir=cache_dir)
    first, _ = tokenize_dataset(rows, tokenizer, max_length=128)
    again, _ = tokenize_dataset(rows, build_char_tokenizer(), max_length=128)
    other, _ = tokenize_dataset(rows, tokenizer, max_length=100)
    assert first.cache_files and first.cache_files == again.cache_files != other.cache_files


def test_loss_covers_only_the_answer(tokenizer_dir, cache_dir, tiny_llama_config):
    """The module's loss on a datamodule batch is cross-entropy over the answer positions alone: the prompt is
    context, never a target."""
    dm = datamodule(tokenizer_dir, cache_dir)
    batch = next(iter(dm.train_dataloader()))
    module = CausalLMModule(config={**tiny_llama_config, "max_position_embeddings": 128})
    logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    answer = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][answer], targets[answer])
    assert torch.allclose(module(**batch).loss, expected, atol=1e-6)
    prompt_positions = (batch["labels"] == IGNORE_INDEX) & (batch["attention_mask"] == 1)
    assert prompt_positions.sum() > answer.sum()  # most tokens are prompt, none of them a target


# --- partitions -------------------------------------------------------------------------------------------------


def _label_share(partition, labels):
    values = sorted(set(labels))
    histograms = label_histogram(partition, labels)
    return np.array([[h.get(v, 0) / max(1, sum(h.values())) for v in values] for h in histograms])


def test_dirichlet_sizes_sum_seeded_and_min_size():
    labels = [i % 7 for i in range(700)]
    partition = dirichlet_partition(labels, num_clients=10, alpha=0.3, seed=5, min_size=20)
    _assert_covers_once(partition, 700)
    assert min(len(part) for part in partition) >= 20
    assert partition == dirichlet_partition(labels, num_clients=10, alpha=0.3, seed=5, min_size=20)
    assert partition != dirichlet_partition(labels, num_clients=10, alpha=0.3, seed=6, min_size=20)


def test_dirichlet_large_alpha_approaches_iid_small_alpha_concentrates():
    labels = [i % 5 for i in range(5000)]
    global_share = np.full(5, 0.2)

    def mean_distance(alpha):
        shares = _label_share(dirichlet_partition(labels, 10, alpha, seed=0), labels)
        return np.abs(shares - global_share).sum(axis=1).mean() / 2  # total variation to the global mix

    assert mean_distance(1e4) < 0.05 and mean_distance(0.05) > 0.5
    assert mean_distance(1e4) < mean_distance(1.0) < mean_distance(0.05)


def test_natural_partition_one_client_per_value():
    labels = ["b", "a", "c", "a", "b", "a"]
    assert natural_partition(labels, 3) == [[1, 3, 5], [0, 4], [2]]
    with pytest.raises(ValueError, match=r"num_clients=2.*3 values \('a', 'b', 'c'\).*num_clients=3"):
        natural_partition(labels, 2)


def test_cluster_labels_group_instructions_by_topic(cache_dir):
    rows = load_examples(DataSource(data_files=ALPACA), seed=0, cache_dir=cache_dir)
    texts = rows["instruction"]
    clusters = cluster_labels(texts, num_clusters=6, seed=0)
    assert clusters == cluster_labels(texts, num_clusters=6, seed=0) and set(clusters) == set(range(6))
    for prefix in ("What is the capital city", "Write a Python function", "Correct the grammar"):
        assert len({c for text, c in zip(texts, clusters) if text.startswith(prefix)}) == 1, prefix
    with pytest.raises(ValueError, match="num_clusters=5.*3 texts"):
        cluster_labels(["a", "b", "c"], num_clusters=5, seed=0)


def test_clusters_follow_topics_not_function_words_or_instruction_verbs():
    asks = [
        "Rewrite the following sentence so that it is about the",
        "Write a short poem of four lines on the",
        "Explain",
    ]
    topics = {"sea": "ocean waves and tides", "tax": "income tax returns and deductions"}
    texts, topic_of = [], []
    for ask in asks:
        for topic, words in topics.items():
            for extra in ("", " today", " again"):
                texts.append(f"{ask} {words}{extra}.")
                topic_of.append(topic)
    clusters = cluster_labels(texts, num_clusters=2, seed=0)
    assert len({(topic, cluster) for topic, cluster in zip(topic_of, clusters)}) == 2  # one cluster per topic


def _word_tokenizer(texts):
    """A word-level tokenizer built from the data: a second tokenizer that splits nothing like the character one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    words = sorted({word for text in texts for word in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    vocab = {token: index for index, token in enumerate(special + [word for word, _ in words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _clients_as_rows(dm, num_clients):
    """Each client's examples as rows of the data before tokenizing."""
    clients = dm.client_partition(num_clients)
    kept = dm.reports["train"].kept
    return [[kept[index] for index in part] for part in clients]


def test_the_cluster_split_is_the_same_whatever_the_tokenizer_or_max_length(tokenizer, cache_dir):
    rows = load_examples(DataSource(data_files=ALPACA), seed=0, cache_dir=cache_dir)
    texts = [row["instruction"] + " " + row["input"] + " " + row["output"] for row in rows]
    options = dict(partition="cluster", num_clusters=6, alpha=0.5, cache_dir=cache_dir, seed=3)
    splits = {}
    setups = [("chars", tokenizer, 512), ("words", _word_tokenizer(texts), 40), ("short", tokenizer, 50)]
    for name, tok, max_length in setups:
        dm = FederatedDataModule(DataSource(data_files=ALPACA), tok, max_length=max_length, **options)
        splits[name] = (_clients_as_rows(dm, 4), set(range(len(rows))) - set(dm.reports["train"].kept))
    full, nothing_dropped = splits["chars"]
    assert not nothing_dropped
    for name in ("words", "short"):
        clients, dropped = splits[name]
        assert dropped, f"{name}: some prompt should fill max_length, or this shows nothing"
        assert clients == [[row for row in part if row not in dropped] for part in full], name
    assert splits["words"][1] != splits["short"][1]


def test_partition_table_shows_sizes_histograms_and_totals():
    labels = ["x", "y", "x", "z", "x"]
    table = format_partition_table([[0, 1], [2, 3, 4]], labels)
    lines = table.splitlines()
    assert lines[0].split() == ["client", "size", "x", "y", "z"]
    assert lines[2].split() == ["0", "2", "1", "1", "0"] and lines[3].split() == ["1", "3", "2", "0", "1"]
    assert lines[-1].split() == ["total", "5", "3", "1", "1"]
    wide = format_partition_table([[0, 1], [2, 3, 4]], labels, max_label_columns=1)
    assert wide.splitlines()[0].split() == ["client", "size", "x", "other"]
    assert format_partition_table([[0], [1, 2]]).splitlines()[-1].split() == ["total", "3"]


def test_plot_partition_writes_a_png(tmp_path):
    labels = [i % 4 for i in range(200)]
    partition = dirichlet_partition(labels, num_clients=6, alpha=0.3, seed=0)
    path = plot_partition(partition, labels, tmp_path / "split" / "heatmap.png", title="Dirichlet(0.3)")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_flwr_partitioner_drives_the_split(tokenizer_dir, cache_dir):
    partitioner_module = pytest.importorskip("flwr_datasets.partitioner")
    rows = load_examples(DataSource(data_files=MATH), seed=0, cache_dir=cache_dir)
    parts = partition_with_flwr(partitioner_module.IidPartitioner(num_partitions=3), rows)
    _assert_covers_once(parts, len(rows))
    dirichlet = partitioner_module.DirichletPartitioner(num_partitions=4, partition_by="source", alpha=0.5, seed=1)
    dm = datamodule(tokenizer_dir, cache_dir, partitioner=dirichlet)
    clients = dm.client_partition(4)
    _assert_covers_once(clients, dm.num_samples)
    with pytest.raises(ValueError, match="makes 4 partitions.*num_clients=5"):
        dm.client_partition(5)


# --- the datamodule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "natural", "cluster"])
def test_every_partition_kind_covers_the_training_set(tokenizer_dir, cache_dir, partition):
    dm = datamodule(tokenizer_dir, cache_dir, partition=partition, alpha=0.5, num_clusters=4)
    num_clients = 6 if partition == "natural" else 5
    clients = dm.client_partition(num_clients)
    _assert_covers_once(clients, dm.num_samples)
    assert clients == dm.client_partition(num_clients) == dm.client_indices
    assert dm.partition_table.splitlines()[-1].split()[:2] == ["total", str(dm.num_samples)]
    if partition == "natural":
        assert all(len(set(dm.train_examples.select(part)["source"])) == 1 for part in clients)


def test_splits_loaders_and_reports(tokenizer, cache_dir, tmp_path):
    eval_source = DataSource(
        path="parquet",
        data_files={"test": GSM8K},
        split="test",
        columns={"instruction": "question", "output": "answer"},
    )
    dm = FederatedDataModule(
        DataSource(data_files=ALPACA),
        tokenizer=tokenizer,  # a tokenizer object works as well as a name or folder
        val_fraction=0.2,
        eval_dataset=eval_source,
        max_length=80,
        batch_size=3,
        eval_batch_size=5,
        partition="cluster",
        num_clusters=5,
        partition_plot=str(tmp_path / "split.png"),
        cache_dir=cache_dir,
    )
    dm.setup("fit")
    reports = dm.reports
    assert set(reports) == {"train", "val", "test"} and reports["train"].truncated > 0
    assert reports["train"].examples + reports["val"].examples == 119 and reports["val"].examples == 24
    assert len(dm.train_dataset) == reports["train"].examples - reports["train"].dropped
    assert len(dm.test_dataset) == len(dm.eval_examples) == 16 and dm.eval_examples[0]["output"].count("####") == 1
    assert len(dm.train_examples) == len(dm.train_dataset)
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[0] == 3
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[0] == 5
    assert next(iter(dm.test_dataloader()))["labels"].shape[0] == 5
    dm.client_partition(4)
    assert (tmp_path / "split.png").stat().st_size > 0
    assert "tokenizer" not in dm.hparams and "partitioner" not in dm.hparams  # objects are not hyperparameters


def test_named_validation_split_and_no_validation(tokenizer_dir, cache_dir):
    files = {"train": MATH, "validation": MATH}
    dm = datamodule(tokenizer_dir, cache_dir, data_files=files, val_split="validation")
    dm.setup()
    assert len(dm.val_dataset) == len(dm.train_dataset) == 150
    plain = datamodule(tokenizer_dir, cache_dir)
    assert plain.val_dataloader() == [] and plain.test_dataloader() == []


def test_local_file_trains_through_the_federated_strategy(tokenizer_dir, cache_dir, tiny_llama_config):
    dm = datamodule(tokenizer_dir, cache_dir, partition="dirichlet", alpha=0.6, val_fraction=0.1)
    module = CausalLMModule(config={**tiny_llama_config, "max_position_embeddings": 128}, learning_rate=1e-2)
    strategy = FederatedBlockStrategy(num_clients=4, local_steps=2, seed=0)
    callback = ParaBlockCallback(staleness=1)
    trainer = quiet_trainer(strategy=strategy, callbacks=[callback], max_epochs=2)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    assert [c.sample_indices for c in strategy.federation.clients.values()] == dm.client_indices
    assert [r.round for r in callback.records if not r.flush] == [0, 1]
    assert np.isfinite(after) and after < before


# --- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "alpha.*positive.*0.0"),
        ({"alpha": -1.0}, "alpha.*positive.*-1.0"),
        ({"partition": "shards"}, r"partition.*'iid', 'dirichlet', 'natural' or 'cluster'.*'shards'"),
        ({"val_fraction": 1.0}, r"val_fraction.*\[0, 1\).*1.0"),
        ({"val_fraction": 0.1, "val_split": "test"}, "either `val_split` \\('test'\\) or `val_fraction` \\(0.1\\)"),
        ({"max_length": 0}, "max_length.*positive.*0"),
        ({"label_column": ""}, r"`label_column` must be a column name of the data, or None to leave it unset, got ''"),
        ({"partition_plot": ""}, r"`partition_plot` must be a path for the PNG heatmap, or None to leave it unset, got ''"),
    ],
)
def test_bad_arguments_are_refused(tokenizer_dir, cache_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        datamodule(tokenizer_dir, cache_dir, **kwargs)


def test_a_val_fraction_that_leaves_no_training_example_is_refused(tmp_path, tokenizer_dir, cache_dir):
    (tmp_path / "three.jsonl").write_text("".join(f'{{"instruction": "q{i}", "output": "a{i}"}}\n' for i in range(3)))
    data = datamodule(tokenizer_dir, cache_dir, data_files=str(tmp_path / "three.jsonl"), val_fraction=0.9)
    with pytest.raises(ValueError, match=r"`val_fraction=0.9` holds out all 3 example\(s\).*at most 2/3"):
        data.setup()


def test_a_dataset_that_is_not_a_data_source_is_refused(tokenizer_dir):
    with pytest.raises(TypeError, match=r"`dataset` must be a DataSource .*got 'train.jsonl'"):
        FederatedDataModule("train.jsonl", tokenizer=tokenizer_dir)
    with pytest.raises(TypeError, match=r"`eval_dataset` must be a DataSource .*got \['test.jsonl'\]"):
        FederatedDataModule(DataSource(data_files=MATH), tokenizer=tokenizer_dir, eval_dataset=["test.jsonl"])


def test_label_column_must_exist_and_is_required_to_skew(tokenizer_dir, cache_dir):
    with pytest.raises(ValueError, match=r"label_column='topic'.*columns are \[.*'source'"):
        datamodule(tokenizer_dir, cache_dir, partition="dirichlet", label_column="topic").client_partition(3)
    with pytest.raises(ValueError, match="partition='natural'.*set `label_column`.*partition='cluster'"):
        datamodule(tokenizer_dir, cache_dir, partition="natural", label_column=None).client_partition(3)


def test_empty_client_and_too_many_clients_are_refused(tokenizer_dir, cache_dir):
    skewed = datamodule(tokenizer_dir, cache_dir, partition="dirichlet", alpha=0.01, min_partition_size=0)
    with pytest.raises(ValueError, match=r"Client\(s\) \[.*\] of 30 got no training example.*dirichlet\(alpha=0.01\)"):
        skewed.client_partition(30)
    with pytest.raises(ValueError, match="num_clients=500.*150 examples.*at most 150"):
        datamodule(tokenizer_dir, cache_dir, partition="iid").client_partition(500)


def test_hyperparameters_rebuild_the_datamodule(tokenizer_dir, cache_dir):
    """A checkpoint stores the sources as dicts; they must build the same datamodule again."""
    eval_source = DataSource(path="parquet", data_files={"test": GSM8K}, split="test")
    dm = datamodule(tokenizer_dir, cache_dir, eval_dataset=eval_source)
    again = FederatedDataModule(**dm.hparams)
    assert again.source == dm.source and again.eval_source == eval_source and again.hparams == dm.hparams
