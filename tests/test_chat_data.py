"""Multi-turn chat data: both layouts read, the loss on every assistant turn and nothing else, with and without
generation marks in the template, truncation, malformed rows refused, partitions and evaluation rows kept."""

import json
import re

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


# --- a conversation column is checked the same whatever stands beside it ----------------------------------------

MALFORMED = {
    "null": None,
    "empty": [],
    "not_a_list": {"role": "user", "content": "hi"},
    "turn_not_a_dict": [["user", "hi"], {"role": "assistant", "content": "A"}],
    "unknown_role": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "A"}],
    "role_not_text": [{"role": 1, "content": "hi"}, {"role": "assistant", "content": "A"}],
    "content_parts": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "A"},
    ],
    "content_number": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 4}],
    "no_answer": [{"role": "user", "content": "hi"}],
    "only_a_greeting": [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "hi"}],
}  # fmt: skip
BESIDE = {
    "alone": {},
    "instruction_columns": {"instruction": "Say hi", "input": "", "output": "hi"},
    "other_columns": {"topic": "greetings", "id": 7},
}


def refusal(folder, rows, **kwargs):
    folder.mkdir()
    with pytest.raises(ValueError) as error:
        datamodule(folder, rows, **kwargs).setup()
    message = str(error.value)
    assert "\n" not in message
    return message.replace(str(folder), "<folder>")


@pytest.mark.parametrize("problem", list(MALFORMED))
@pytest.mark.parametrize("beside", ["instruction_columns", "other_columns"])
def test_a_conversation_column_beside_other_columns_is_checked_as_when_it_stands_alone(tmp_path, problem, beside):
    def rows(extra):
        good = [{"messages": row["messages"], **extra} for row in chat_rows(4)]
        return [*good[:2], {"messages": MALFORMED[problem], **extra}, *good[2:]]

    alone = refusal(tmp_path / "alone", rows(BESIDE["alone"]))
    assert "chat.jsonl' (line 3), row 2" in alone, alone
    assert refusal(tmp_path / "beside", rows(BESIDE[beside])) == alone


@pytest.mark.parametrize("problem", ["null", "unknown_role"])
def test_a_conversation_column_missing_from_a_row_or_read_from_parquet_is_checked_after_loading(tmp_path, problem):
    import pandas as pd

    rows = [{"messages": row["messages"], "instruction": "x", "output": "y"} for row in chat_rows(4)]
    if problem == "null":
        del rows[2]["messages"]  # datasets fills the missing key with null
        message = r"chat\.jsonl \[train\], row 2: a conversation must be a non-empty list of turns, got None"
        data = datamodule(tmp_path, rows)
    else:
        rows[2]["messages"][2]["role"] = "bot"
        pd.DataFrame(rows).to_parquet(tmp_path / "chat.parquet")
        message = r"chat\.parquet \[train\], row 2, turn 2: unknown role 'bot'"
        data = datamodule(tmp_path, rows, dataset={"data_files": str(tmp_path / "chat.parquet")})
    with pytest.raises(ValueError, match=message):
        data.setup()


def test_the_conversation_is_trained_beside_instruction_columns_and_they_are_read_from_it(tmp_path):
    rows = [{"instruction": "unused", "output": "unused", **row} for row in chat_rows(4)]
    data = datamodule(tmp_path, rows)
    data.setup()
    assert supervised_text(data.tokenizer, data.train_dataset[0]) == "A0</s>B0</s>"
    assert data.train_examples[0]["instruction"] == "Tell me about apples and pears 0"
    assert data.train_examples[0]["output"] == "B0"


def test_instruction_columns_named_over_data_with_a_conversation_column_are_refused_not_ignored(tmp_path):
    rows = [{"question": "q", **row} for row in chat_rows(4)]
    files = write_jsonl(tmp_path / "chat.jsonl", rows)
    data = datamodule(tmp_path, rows, dataset={"data_files": files, "columns": {"instruction": "question"}})
    with pytest.raises(ValueError, match=r"has the conversation column 'messages', which is what is trained, but"):
        data.setup()


def test_a_mixed_type_column_names_the_row_as_written_not_as_datasets_converted_it(tmp_path):
    rows = chat_rows(6)
    rows[0]["messages"][0]["content"] = "0."  # JSON-typed, the column would decode this to 0.0 and blame row 0
    rows[4]["messages"][2]["content"] = [{"type": "text", "text": "More?"}]
    message = refusal(tmp_path / "data", rows)
    where = "Data file '<folder>/chat.jsonl' (line 5), row 4, turn 2"
    assert message.startswith(f"{where}: the user turn's content must be text, got list"), message
    assert "list [{'type': 'text'" in message and "join a list of content parts" in message


# --- both ways of finding assistant turns agree on every conversation ---------------------------------------------

GREETING = [
    {"role": "system", "content": "Be brief."},
    {"role": "assistant", "content": "Hello! Ask away."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, PLAIN_CHAT_TEMPLATE], ids=["generation_marks", "prefixes"])
def test_an_assistant_turn_before_the_first_user_turn_is_context_on_both_paths(template):
    tokenizer = chat_tokenizer(template)
    features = encode_conversation(GREETING, tokenizer)
    assert supervised_text(tokenizer, features) == "4</s>"
    assert tokenizer.decode(features["input_ids"]) == tokenizer.apply_chat_template(GREETING, tokenize=False)


@pytest.mark.parametrize(
    "conversation",
    [
        GREETING,
        GREETING[1:],  # the greeting opens the conversation
        [*CONVERSATION, {"role": "assistant", "content": "Anything else?"}],  # two answers in a row
        [*CONVERSATION, {"role": "user", "content": "Thanks"}],  # ends with the user
        [{"role": "user", "content": "Say nothing"}, {"role": "assistant", "content": ""}],
    ],
    ids=["greeting_after_system", "greeting_first", "two_answers", "user_last", "empty_answer"],
)
def test_both_ways_of_finding_assistant_turns_agree_on_every_valid_conversation(conversation):
    assert encode_conversation(conversation, chat_tokenizer(CHAT_TEMPLATE)) == encode_conversation(
        conversation, chat_tokenizer(PLAIN_CHAT_TEMPLATE)
    )


def test_both_ways_keep_a_token_that_straddles_the_start_of_an_answer():
    def tokenizer(template):
        straddling = chat_tokenizer(template)
        straddling.add_tokens(["t\nHe"])  # "<s>assistant\nHello": the header's end and the answer's start
        return straddling

    marked, found = (encode_conversation(CONVERSATION, tokenizer(t)) for t in (CHAT_TEMPLATE, PLAIN_CHAT_TEMPLATE))
    assert marked == found
    assert supervised_text(tokenizer(CHAT_TEMPLATE), found) == "t\nHello</s>4</s>"


def test_the_datamodule_trains_a_conversation_that_opens_with_a_greeting(tmp_path):
    rows = [{"messages": GREETING}] * 2 + [{"messages": GREETING[1:]}] * 2
    data = datamodule(tmp_path, rows)
    data.setup()
    assert [supervised_text(data.tokenizer, row) for row in data.train_dataset] == ["4</s>"] * 4
    assert data.train_examples[0]["instruction"] == "2+2?"


# --- a template that cannot render a row is one line naming the file and the row ---------------------------------

NO_SYSTEM = "{%- if messages[0]['role'] == 'system' -%}{{ raise_exception('System role not supported') }}{%- endif -%}"
NO_BOOM = (
    "{%- for m in messages -%}{%- if 'BOOM' in m['content'] -%}{{ raise_exception('no BOOM') }}{%- endif -%}"
    "{%- endfor -%}"
)
DROPS_EARLIER_THINKING = PLAIN_CHAT_TEMPLATE.replace(
    "{{- message['content'] + '</s>' -}}{%- else -%}",
    "{{- (message['content'] if loop.last else message['content'].split('</think>')[-1]) + '</s>' -}}{%- else -%}",
)
"""Qwen3's habit: an earlier assistant turn's ``<think>`` block is dropped once the conversation goes on."""


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, PLAIN_CHAT_TEMPLATE], ids=["generation_marks", "prefixes"])
def test_a_template_that_raises_on_a_row_is_refused_naming_the_file_and_the_row(tmp_path, template):
    rows = chat_rows(4)
    rows[2]["messages"].insert(0, {"role": "system", "content": "Be brief."})
    message = refusal(tmp_path / "data", rows, tokenizer=chat_tokenizer(NO_SYSTEM + template))
    assert message.startswith("<folder>/chat.jsonl [train], row 2: the tokenizer's chat template refused"), message
    assert "TemplateError: System role not supported" in message


def test_the_row_named_is_the_files_row_after_shuffling_and_holding_out(tmp_path):
    rows = chat_rows(20)
    rows[13]["messages"][3]["content"] = "BOOM"
    files = write_jsonl(tmp_path / "rows.jsonl", rows)
    message = refusal(tmp_path / "data", rows, tokenizer=chat_tokenizer(NO_BOOM + CHAT_TEMPLATE), val_fraction=0.25,
                      dataset={"data_files": files, "max_examples": 18})  # fmt: skip
    assert ", row 13: the tokenizer's chat template refused" in message, message


def test_instruction_data_in_the_chat_format_names_the_row_a_template_refuses(tmp_path):
    rows = [{"instruction": f"q{i}", "output": "BOOM" if i == 3 else "a"} for i in range(5)]
    message = refusal(tmp_path / "data", rows, tokenizer=chat_tokenizer(NO_BOOM + CHAT_TEMPLATE), prompt_format="chat")
    assert message.startswith("<folder>/chat.jsonl [train], row 3: the tokenizer's chat template refused"), message


def test_a_template_that_renders_a_prefix_differently_is_one_line_naming_the_row_without_the_text(tmp_path):
    rows = chat_rows(4)
    rows[1]["messages"][1]["content"] = "<think>Apples grow on trees.</think>A1"
    message = refusal(tmp_path / "data", rows, tokenizer=chat_tokenizer(DROPS_EARLIER_THINKING))
    assert message.startswith("<folder>/chat.jsonl [train], row 1: the chat template renders the conversation"), message
    assert "part at character" in message and "{% generation %}" in message
    assert "Apples" not in message and "<s>" not in message  # the rendered text is not dumped


@pytest.mark.parametrize(
    "words", ["What is it? Tell me about this.", "", "a b c ? !"], ids=["stop_words", "empty", "too_short"]
)
def test_cluster_partition_over_turns_without_content_words_names_the_partition_and_an_alternative(tmp_path, words):
    rows = chat_rows(6)
    for row in rows:
        row["messages"][0]["content"] = row["messages"][2]["content"] = words
    data = datamodule(tmp_path, rows, partition="cluster", num_clusters=2)
    with pytest.raises(ValueError) as error:
        data.client_partition(2)
    message = str(error.value)
    assert "`partition='cluster'` found no content word" in message and "label_column" in message, message
    assert "partition='iid'" in message and "\n" not in message


CLI_CHAT_PROBLEMS = {
    "template_raises": (NO_SYSTEM + CHAT_TEMPLATE, None, r"chat\.jsonl \[train\], row \d+: the tokenizer's chat"),
    "prefix_differs": (DROPS_EARLIER_THINKING, "<think>P.</think>Tip", r"chat\.jsonl \[train\], row \d+: the chat"),
    "stop_words": (CHAT_TEMPLATE, "What is it?", r"`partition='cluster'` found no content word"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("problem", list(CLI_CHAT_PROBLEMS))
def test_parablock_fit_refuses_a_chat_problem_in_one_line_with_exit_status_2(tmp_path, capsys, problem):
    import torch
    from pretrained import save_tiny_checkpoint
    from test_cli_refusals import refused, snapshot
    from test_finetune_recipe import recipe_args

    template, text, message = CLI_CHAT_PROBLEMS[problem]
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint", torch.float32, template=template)
    args = recipe_args(tmp_path, checkpoint)
    if text is not None:  # every user turn (stop_words) or every answer (prefix_differs) becomes `text`
        role = "user" if problem == "stop_words" else "assistant"
        rows = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
        for row in rows:
            for turn in row["messages"]:
                turn["content"] = text if turn["role"] == role else turn["content"]
        write_jsonl(tmp_path / "chat.jsonl", rows)
    before = snapshot(tmp_path)
    err = refused(capsys, args)
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    after = {path: data for path, data in snapshot(tmp_path).items() if not path.startswith("cache")}
    assert after == before  # no run folder (the datasets cache aside)
