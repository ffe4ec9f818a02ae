import json
from pathlib import Path

import pytest

from lightning_parablock.data import build_char_tokenizer, format_prompt
from lightning_parablock.eval import (
    answer_mtbench,
    conversation_prompt,
    encode_prompt,
    export_mtbench_answers,
    generate_from_ids,
    load_mtbench_questions,
    write_jsonl_atomic,
)
from lightning_parablock.module import CausalLMModule

QUESTION_FILE = Path(__file__).parent / "fixtures" / "mtbench_questions.jsonl"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)
MAX_NEW_TOKENS = 8


@pytest.fixture
def model(tiny_llama_config):
    return CausalLMModule(config={**tiny_llama_config, "max_position_embeddings": 256}, seed=0).model


@pytest.fixture
def chat_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_export_writes_fastchat_model_answers(model, chat_tokenizer, tmp_path):
    answer_file = tmp_path / "model_answer" / "tiny-llama.jsonl"
    records = export_mtbench_answers(
        model, chat_tokenizer, QUESTION_FILE, answer_file, "tiny-llama", batch_size=2, max_new_tokens=MAX_NEW_TOKENS
    )
    lines = answer_file.read_text().splitlines()
    written = [json.loads(line) for line in lines]
    assert written == records
    assert [r["question_id"] for r in written] == [1, 2, 3]
    for record in written:
        assert set(record) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert record["model_id"] == "tiny-llama" and isinstance(record["tstamp"], float)
        assert len(record["answer_id"]) == 32 and int(record["answer_id"], 16) >= 0
        [choice] = record["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == 2
        assert all(
            len(chat_tokenizer.encode(turn, add_special_tokens=False)) <= MAX_NEW_TOKENS for turn in choice["turns"]
        )
    assert len({r["answer_id"] for r in written}) == 3
    assert [p.name for p in answer_file.parent.iterdir()] == ["tiny-llama.jsonl"]  # no temporary file left


def test_second_turn_sees_the_first_answer(model, chat_tokenizer):
    questions = load_mtbench_questions(QUESTION_FILE)
    records = answer_mtbench(model, chat_tokenizer, questions, "tiny", batch_size=3, max_new_tokens=MAX_NEW_TOKENS)
    question, (first, second) = questions[1], records[1]["choices"][0]["turns"]
    prompt = conversation_prompt(chat_tokenizer, question["turns"], [first])
    assert prompt == f"U: {question['turns'][0]}\nA: {first}\nU: {question['turns'][1]}\nA: "
    [expected] = generate_from_ids(model, chat_tokenizer, [encode_prompt(chat_tokenizer, prompt)], 1, MAX_NEW_TOKENS)
    assert second == expected.strip()
    # greedy: a second export answers the same
    again = answer_mtbench(model, chat_tokenizer, questions, "tiny", batch_size=2, max_new_tokens=MAX_NEW_TOKENS)
    assert [r["choices"] for r in again] == [r["choices"] for r in records]


def test_without_a_chat_template_the_alpaca_format_continues(model):
    tokenizer = build_char_tokenizer()
    assert conversation_prompt(tokenizer, ["Write a haiku."], []) == format_prompt("Write a haiku.")
    second = conversation_prompt(tokenizer, ["Write a haiku.", "Now in French."], ["Leaves fall."])
    assert (
        second
        == format_prompt("Write a haiku.") + "Leaves fall.\n\n### Instruction:\nNow in French.\n\n### Response:\n"
    )
    records = answer_mtbench(model, tokenizer, load_mtbench_questions(QUESTION_FILE), "tiny", max_new_tokens=4)
    assert all(len(r["choices"][0]["turns"]) == 2 for r in records)
    with pytest.raises(ValueError, match="got 2 turns and 0 answers"):
        conversation_prompt(tokenizer, ["a", "b"], [])


def test_atomic_write_leaves_the_old_file_when_a_record_fails(tmp_path):
    path = tmp_path / "answers.jsonl"
    write_jsonl_atomic([{"question_id": 1}], path)
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_jsonl_atomic([{"question_id": 2}, {"question_id": 3, "turns": {"a set"}}], path)
    assert path.read_text() == '{"question_id": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"question_id": 1, "category": "math"}', r"line 2: `turns` must be of type list, got None"),
        ('{"question_id": 1, "category": "math", "turns": []}', "line 2: `turns` must be a non-empty list"),
        (
            '{"question_id": true, "category": "math", "turns": ["q"]}',
            "`question_id` must be of type int or str, got True",
        ),
        ('{"question_id": 7, "turns": ["q"]}', "`category` must be of type str, got None"),
        ('{"question_id": 7, "category": "math", "turns": ["q"]', "line 2 is not valid JSON"),
        ("[1, 2]", "line 2 must be a JSON object, got list"),
        ('{"question_id": 7, "category": "math", "turns": ["q"]}', "`question_id` 7 appears twice"),
    ],
)
def test_bad_question_files_are_refused_naming_the_line(tmp_path, line, match):
    path = tmp_path / "question.jsonl"
    path.write_text('{"question_id": 7, "category": "writing", "turns": ["Hi."]}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        load_mtbench_questions(path)


def test_model_id_is_required(model, chat_tokenizer):
    with pytest.raises(ValueError, match="`model_id` must be a non-empty str.*got ''"):
        answer_mtbench(model, chat_tokenizer, load_mtbench_questions(QUESTION_FILE), "")


def test_a_model_fine_tuned_on_alpaca_is_asked_in_alpaca_even_with_a_chat_template(chat_tokenizer):
    turns, answers = ["Write a haiku.", "Now in French."], ["Leaves fall."]
    alpaca = conversation_prompt(chat_tokenizer, turns, answers, prompt_format="alpaca_lora")
    assert alpaca == conversation_prompt(build_char_tokenizer(), turns, answers)
    assert conversation_prompt(chat_tokenizer, turns, answers) != alpaca  # auto: the chat template
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        conversation_prompt(build_char_tokenizer(), turns, answers, prompt_format="chat")


def test_temperatures_are_fastchats_per_category():
    from lightning_parablock.eval import FASTCHAT_TEMPERATURES, question_temperature

    # fastchat/llm_judge/common.py, temperature_config
    assert FASTCHAT_TEMPERATURES == {
        "writing": 0.7,
        "roleplay": 0.7,
        "extraction": 0.0,
        "math": 0.0,
        "coding": 0.0,
        "reasoning": 0.0,
        "stem": 0.1,
        "humanities": 0.1,
        "arena-hard-200": 0.0,
    }
    assert question_temperature({"category": "poetry"}) == 0.7  # gen_model_answer's default
    assert question_temperature({"category": "writing"}, greedy=True) == 0.0


def test_answers_are_cleaned_up_as_fastchat_does():
    from lightning_parablock.eval import fastchat_output

    tokenizer = build_char_tokenizer()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = tokenizer.encode(" Bonjour.\n### Instruction: more", add_special_tokens=False)
    assert fastchat_output(ids, tokenizer, {eos}, ["### Instruction:"]) == "Bonjour."
    assert fastchat_output([*ids[:9], eos, *ids[9:]], tokenizer, {eos}, []) == "Bonjour."  # cut at a stop token
    assert fastchat_output([ids[1], pad, ids[2]], tokenizer, {eos}, []) == "Bo"  # special tokens' text removed
    # a stop string at the very start is not cut: FastChat keeps it (`output.find(stop_str) > 0`)
    start = tokenizer.encode("### Instruction: x", add_special_tokens=False)
    assert fastchat_output(start, tokenizer, {eos}, ["### Instruction:"]) == "### Instruction: x"


def test_sampled_categories_are_seeded_per_question_as_fastchat_seeds_them(model, chat_tokenizer):
    import torch

    from lightning_parablock.eval import generate_token_ids
    from lightning_parablock.eval.mtbench import fastchat_output

    questions = load_mtbench_questions(QUESTION_FILE)  # writing (0.7), math (greedy), roleplay (0.7)
    state = torch.get_rng_state()
    sampled = answer_mtbench(model, chat_tokenizer, questions, "tiny", max_new_tokens=MAX_NEW_TOKENS)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    greedy = answer_mtbench(model, chat_tokenizer, questions, "tiny", max_new_tokens=MAX_NEW_TOKENS, greedy=True)
    turns = [record["choices"][0]["turns"] for record in sampled]
    assert turns[1] == greedy[1]["choices"][0]["turns"]  # math is greedy either way
    assert turns != [record["choices"][0]["turns"] for record in greedy]

    torch.manual_seed(0)  # FastChat: torch.manual_seed(choice index) before each question, then every turn
    expected: list[str] = []
    for turn in range(2):
        prompt = conversation_prompt(chat_tokenizer, questions[2]["turns"][: turn + 1], expected)
        prompt_ids = [encode_prompt(chat_tokenizer, prompt)]
        [ids] = generate_token_ids(model, chat_tokenizer, prompt_ids, 1, MAX_NEW_TOKENS, (), temperature=0.7)
        expected.append(fastchat_output(ids, chat_tokenizer, {chat_tokenizer.eos_token_id}, ()))
    assert turns[2] == expected
