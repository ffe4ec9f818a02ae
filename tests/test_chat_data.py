"""Multi-turn chat data: both layouts read, the loss on every assistant turn and nothing else, with and without
generation marks in the template, truncation, malformed rows refused, partitions and evaluation rows kept."""

import json

import pytest
from pretrained import CHAT_TEMPLATE, PLAIN_CHAT_TEMPLATE, chat_tokenizer

from lightning_parablock.data import IGNORE_INDEX, FederatedDataModule
from lightning_parablock.data.chat import encode_conversation

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def supervised_text(tokenizer, features):
    return tokenizer.decode([t for t in features["labels"] if t != IGNORE_INDEX])


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, PLAIN_CHAT_TEMPLATE], ids=["generation_marks", "prefixes"])
def test_loss_covers_every_assistant_turn_and_its_end_marker_only(template):
    tokenizer = chat_tokenizer(template)
    features = encode_conversation(CONVERSATION, tokenizer)
    assert supervised_text(tokenizer, features) == "Hello</s>4</s>"
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(features["input_ids"]) == rendered  # the system prompt and user turns are context


def test_both_ways_of_finding_assistant_turns_agree():
    marked = encode_conversation(CONVERSATION, chat_tokenizer(CHAT_TEMPLATE))
    found = encode_conversation(CONVERSATION, chat_tokenizer(PLAIN_CHAT_TEMPLATE))
    assert marked == found


def test_a_tokenizer_without_a_chat_template_is_refused():
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        encode_conversation(CONVERSATION, tokenizer)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def sharegpt(turns):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": names[t["role"]], "value": t["content"]} for t in turns]


def chat_rows(n):
    topics = ["apples and pears", "rockets to the moon", "tax forms"]
    return [
        {
            "messages": [
                {"role": "user", "content": f"Tell me about {topics[i % 3]} {i}"},
                {"role": "assistant", "content": f"A{i}"},
                {"role": "user", "content": "More?"},
                {"role": "assistant", "content": f"B{i}"},
            ],
            "topic": topics[i % 3],
        }
        for i in range(n)
    ]


def datamodule(tmp_path, rows, **kwargs):
    files = write_jsonl(tmp_path / "chat.jsonl", rows)
    options = dict(dataset={"data_files": files}, tokenizer=chat_tokenizer(), max_length=96, batch_size=2,
                   cache_dir=str(tmp_path / "cache"))  # fmt: skip
    return FederatedDataModule(**{**options, **kwargs})


@pytest.mark.parametrize("layout", ["messages", "conversations"])
def test_the_datamodule_finds_either_layout_and_trains_on_assistant_turns(tmp_path, layout):
    rows = chat_rows(6)
    if layout == "conversations":
        rows = [{"conversations": sharegpt(row["messages"]), "topic": row["topic"]} for row in rows]
    data = datamodule(tmp_path, rows)
    data.setup()
    tokenizer = data.tokenizer
    assert supervised_text(tokenizer, data.train_dataset[0]) == "A0</s>B0</s>"
    assert data.train_examples[0]["instruction"] == "Tell me about apples and pears 0"  # what evaluation reads
    assert data.train_examples[0]["output"] == "B0"


def test_a_named_conversation_column_is_read(tmp_path):
    rows = [{"dialog": row["messages"]} for row in chat_rows(2)]
    data = datamodule(tmp_path, rows, dataset={"data_files": write_jsonl(tmp_path / "d.jsonl", rows),
                                               "columns": {"messages": "dialog"}})  # fmt: skip
    data.setup()
    assert supervised_text(data.tokenizer, data.train_dataset[1]) == "A1</s>B1</s>"


def test_a_cut_inside_an_assistant_turn_keeps_the_answer_so_far_and_drops_conversations_left_without_one(tmp_path):
    rows = chat_rows(2)
    rows[1]["messages"][0]["content"] = "x" * 200  # the first user turn alone fills max_length
    whole = encode_conversation(rows[0]["messages"], chat_tokenizer())
    max_length = len(whole["input_ids"]) - 2  # cuts the last answer's "0</s>"
    data = datamodule(tmp_path, rows, max_length=max_length)
    data.setup()
    cut = data.train_dataset[0]
    assert len(cut["input_ids"]) == max_length and cut["labels"] == whole["labels"][:max_length]
    assert supervised_text(data.tokenizer, cut) == "A0</s>B"
    assert data.reports["train"].truncated == 2 and data.reports["train"].dropped == 1


@pytest.mark.parametrize(
    "turn, message",
    [
        ({"role": "bot", "content": "hi"}, r"row 1, turn 1: unknown role 'bot'; use one of \['system', 'user'"),
        ({"role": "assistant", "content": None}, r"row 1, turn 1: the assistant turn's content must be text, got None"),
    ],
)
def test_a_malformed_row_is_refused_naming_the_file_and_the_row(tmp_path, turn, message):
    rows = chat_rows(3)
    rows[1]["messages"][1] = turn
    data = datamodule(tmp_path, rows)
    with pytest.raises(ValueError, match=r"chat\.jsonl.*" + message):
        data.setup()


def test_partitions_split_conversations_by_label_and_by_user_turn_clusters(tmp_path):
    rows = chat_rows(12)
    by_topic = datamodule(tmp_path, rows, partition="dirichlet", label_column="topic", alpha=0.1)
    parts = by_topic.client_partition(3)
    assert sorted(i for part in parts for i in part) == list(range(12))
    clustered = datamodule(tmp_path, rows, partition="cluster", num_clusters=3, alpha=100.0)
    labels = clustered.labels()
    assert len(set(labels)) == 3 and labels[0] == labels[3] != labels[1]  # the topic is in the user turns
    assert sorted(i for part in clustered.client_partition(2) for i in part) == list(range(12))


def test_mtbench_answers_and_gsm8k_rows_come_from_a_chat_model_and_chat_data(tmp_path):
    import torch
    from pretrained import save_tiny_checkpoint
    from transformers import AutoModelForCausalLM

    from lightning_parablock.eval.mtbench import answer_mtbench

    folder = save_tiny_checkpoint(tmp_path / "chat_model", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder)
    questions = [{"question_id": 1, "category": "math", "turns": ["2+2?", "And 3+3?"]}]
    records = answer_mtbench(model, chat_tokenizer(), questions, "tiny", 1, 4, "auto", True, 0)
    assert len(records) == 1 and len(records[0]["choices"][0]["turns"]) == 2
    rows = [{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "#### 4"}]}]
    data = datamodule(tmp_path, rows * 2, eval_dataset={"data_files": write_jsonl(tmp_path / "t.jsonl", rows)})
    data.setup()
    assert data.eval_examples[0]["instruction"] == "What is 2+2?" and data.eval_examples[0]["output"] == "#### 4"
