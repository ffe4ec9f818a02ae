"""Prompt formats: both Alpaca templates to the byte, lm-eval's gsm8k prompt, conversations and stop strings."""

from pathlib import Path

import pytest
import yaml

from lightning_parablock.data import (
    PROMPT_FORMATS,
    build_char_tokenizer,
    conversation_prompt,
    format_prompt,
    stop_strings,
)
from lightning_parablock.data.prompts import resolve_prompt_format

# tatsu-lab/stanford_alpaca, train.py, PROMPT_DICT
STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
STANFORD_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
# tloen/alpaca-lora, templates/alpaca.json
ALPACA_LORA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_LORA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a"
    " response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


@pytest.mark.parametrize(
    ("prompt_format", "no_input", "with_input"),
    [
        ("stanford_alpaca", STANFORD_NO_INPUT, STANFORD_WITH_INPUT),
        ("alpaca_lora", ALPACA_LORA_NO_INPUT, ALPACA_LORA_WITH_INPUT),
    ],
)
def test_both_alpaca_templates_are_their_repositories_to_the_byte(prompt_format, no_input, with_input):
    assert format_prompt("Add.", prompt_format=prompt_format) == no_input.format(instruction="Add.")
    assert format_prompt("Add.", "", prompt_format) == no_input.format(instruction="Add.")
    assert format_prompt("Add.", "1 2", prompt_format) == with_input.format(instruction="Add.", input="1 2")


def test_the_two_alpaca_templates_differ_by_the_newline_after_response():
    stanford = format_prompt("Add.", prompt_format="stanford_alpaca")
    assert format_prompt("Add.", prompt_format="alpaca_lora") == stanford + "\n"
    assert format_prompt("Add.") == format_prompt("Add.", prompt_format="alpaca_lora")  # the default


def test_question_answer_is_lm_evals_gsm8k_prompt_with_its_few_shot_layout():
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
    config = yaml.safe_load((Path(lm_eval_tasks.__file__).parent / "gsm8k" / "gsm8k.yaml").read_text())
    question = "How many pens are in 9 boxes of 12?"
    assert format_prompt(question, prompt_format="question_answer") == config["doc_to_text"].replace(
        "{{question}}", question
    )
    # lm-eval: shots as text + target_delimiter " " + target, joined by fewshot_delimiter "\n\n"
    shots = [("1 + 1?", "1 + 1 = 2\n#### 2"), ("2 * 3?", "#### 6")]
    expected = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots) + f"Question: {question}\nAnswer:"
    turns, answers = [q for q, _ in shots] + [question], [a for _, a in shots]
    assert conversation_prompt(None, turns, answers, "question_answer") == expected
    assert stop_strings(None, "question_answer") == ("Question:",)


def test_an_alpaca_conversation_continues_without_repeating_the_preamble():
    second = conversation_prompt(None, ["Write a haiku.", "Now in French."], ["Leaves fall."], "alpaca_lora")
    follow_up = "Leaves fall.\n\n### Instruction:\nNow in French.\n\n### Response:\n"
    assert second == format_prompt("Write a haiku.") + follow_up
    stanford = conversation_prompt(None, ["Write a haiku.", "Now in French."], ["Leaves fall."], "stanford_alpaca")
    assert stanford == second.replace("### Response:\n", "### Response:")
    assert stop_strings(None, "alpaca_lora") == stop_strings(None, "stanford_alpaca") == ("### Instruction:",)


def test_auto_is_chat_with_a_template_and_alpaca_lora_without():
    tokenizer = build_char_tokenizer()
    assert resolve_prompt_format(tokenizer, "auto") == "alpaca_lora"
    tokenizer.chat_template = CHAT_TEMPLATE
    assert resolve_prompt_format(tokenizer, "auto") == "chat"
    assert conversation_prompt(tokenizer, ["Hi.", "Again."], ["Hello."]) == "U: Hi.\nA: Hello.\nU: Again.\nA: "
    assert stop_strings(tokenizer, "auto") == ()


@pytest.mark.parametrize(
    ("prompt_format", "match"),
    [
        ("alpaca", "'alpaca'.*no longer accepted.*'alpaca_lora'.*'stanford_alpaca'"),
        ("vicuna", r"must be one of \('stanford_alpaca', 'alpaca_lora', 'question_answer', 'chat', 'auto'\)"),
        ("chat", "needs a tokenizer with a chat template"),
    ],
)
def test_bad_formats_are_refused_naming_the_accepted_ones(prompt_format, match):
    with pytest.raises(ValueError, match=match):
        resolve_prompt_format(build_char_tokenizer(), prompt_format)
    assert "alpaca" not in PROMPT_FORMATS
