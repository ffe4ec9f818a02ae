"""Prompt formats: how an instruction (and the answers before it) becomes the text a model is asked to continue.

One ``prompt_format`` means the same thing everywhere: FederatedDataModule trains with it, GSM8KEvaluation asks
with it and the MT-Bench export converses in it, so a model is evaluated in the format it was fine-tuned with.

- ``stanford_alpaca``: Stanford Alpaca's template (``tatsu-lab/stanford_alpaca``, ``train.py``); the prompt ends
  with ``### Response:`` and the response follows it directly.
- ``alpaca_lora``: Alpaca-LoRA's template (``tloen/alpaca-lora``, ``templates/alpaca.json``): the same words with
  a newline after ``### Response:``.
- ``question_answer``: ``Question: ...\\nAnswer:`` and a space before the response, the prompt of
  lm-evaluation-harness's ``gsm8k`` task (the Open LLM Leaderboard's).
- ``chat``: the tokenizer's chat template, user and assistant messages.
- ``auto``: ``chat`` when the tokenizer has a chat template, else ``alpaca_lora``.

A conversation (an MT-Bench question's second turn, or few-shot examples before a question) is the first turn's
prompt, each answer, and every later turn in the format's follow-up form, separated by a blank line.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional

from transformers import PreTrainedTokenizerBase

from lightning_parablock.data.chat_template import render

PromptFormat = Literal["stanford_alpaca", "alpaca_lora", "question_answer", "chat", "auto"]
PROMPT_FORMATS = ("stanford_alpaca", "alpaca_lora", "question_answer", "chat", "auto")

PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
INSTRUCTION_HEADER = "### Instruction:\n"
INPUT_HEADER = "### Input:\n"
RESPONSE_HEADER = "### Response:\n"
TURN_SEPARATOR = "\n\n"
"""Between an answer and the next turn of a conversation (lm-eval's few-shot delimiter too)."""


@dataclass(frozen=True)
class TextTemplate:
    """A plain-text prompt format: its prompts with and without an input, and its follow-up turn."""

    no_input: str
    with_input: str
    follow_up: str
    response_prefix: str
    """Written between the prompt and the response when training and in earlier turns of a conversation."""
    stop: tuple[str, ...]
    """Text that opens a new turn: a model that writes it has answered and starts inventing the next question."""

    def prompt(self, instruction: str, input: Optional[str] = None) -> str:
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.no_input.format(instruction=instruction)


_ALPACA_NO_INPUT = f"{PREAMBLE_NO_INPUT}\n\n{INSTRUCTION_HEADER}{{instruction}}\n\n{RESPONSE_HEADER}"
_ALPACA_WITH_INPUT = (
    f"{PREAMBLE_WITH_INPUT}\n\n{INSTRUCTION_HEADER}{{instruction}}\n\n{INPUT_HEADER}{{input}}\n\n{RESPONSE_HEADER}"
)
_ALPACA_FOLLOW_UP = f"{INSTRUCTION_HEADER}{{instruction}}\n\n{RESPONSE_HEADER}"

TEMPLATES: dict[str, TextTemplate] = {
    "stanford_alpaca": TextTemplate(
        no_input=_ALPACA_NO_INPUT.removesuffix("\n"),
        with_input=_ALPACA_WITH_INPUT.removesuffix("\n"),
        follow_up=_ALPACA_FOLLOW_UP.removesuffix("\n"),
        response_prefix="",
        stop=("### Instruction:",),
    ),
    "alpaca_lora": TextTemplate(
        no_input=_ALPACA_NO_INPUT,
        with_input=_ALPACA_WITH_INPUT,
        follow_up=_ALPACA_FOLLOW_UP,
        response_prefix="",
        stop=("### Instruction:",),
    ),
    "question_answer": TextTemplate(
        no_input="Question: {instruction}\nAnswer:",
        with_input="Question: {instruction}\n{input}\nAnswer:",
        follow_up="Question: {instruction}\nAnswer:",
        response_prefix=" ",
        stop=("Question:",),
    ),
}
"""The plain-text formats, by name."""

_RENAMED = {
    "alpaca": "`prompt_format='alpaca'` named two templates that differ by one newline and is no longer accepted:"
    " use 'alpaca_lora' for the prompts it produced (Alpaca-LoRA's template, '### Response:' and a newline) or"
    " 'stanford_alpaca' for Stanford Alpaca's ('### Response:' with the response right after it)."
}


def resolve_prompt_format(tokenizer: Optional[PreTrainedTokenizerBase], prompt_format: str) -> str:
    """The concrete format: ``auto`` becomes ``chat`` when the tokenizer has a chat template, else ``alpaca_lora``.

    Raises:
        ValueError: for a name that is not a format (naming the accepted ones), or ``chat`` without a template.
    """
    if prompt_format in _RENAMED:
        raise ValueError(f"{_RENAMED[prompt_format]} Accepted: {PROMPT_FORMATS}.")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"`prompt_format` must be one of {PROMPT_FORMATS}, got {prompt_format!r}.")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not has_template:
        name = getattr(tokenizer, "name_or_path", None) or "this one"
        raise ValueError(
            f"`prompt_format='chat'` needs a tokenizer with a chat template; {name!r} has none. Use one of"
            f" {tuple(TEMPLATES)} (or 'auto', which picks 'alpaca_lora' here)."
        )
    if prompt_format == "auto":
        return "chat" if has_template else "alpaca_lora"
    return prompt_format


def check_prompt_format(prompt_format: str) -> None:
    """Refuse a name that is not a format now, before a tokenizer is at hand (``chat`` is checked later)."""
    resolve_prompt_format(None, "auto" if prompt_format == "chat" else prompt_format)


def format_prompt(instruction: str, input: Optional[str] = None, prompt_format: str = "alpaca_lora") -> str:
    """The prompt of one instruction in a plain-text format; an empty ``input`` uses the template without it,
    as both Alpaca repositories do."""
    if prompt_format not in TEMPLATES:
        resolve_prompt_format(None, prompt_format)  # names the accepted values for an unknown one
        raise ValueError(f"`format_prompt` renders the plain-text formats {tuple(TEMPLATES)}, got {prompt_format!r}.")
    return TEMPLATES[prompt_format].prompt(instruction, input)


def conversation_prompt(
    tokenizer: Optional[PreTrainedTokenizerBase],
    turns: Sequence[str],
    answers: Sequence[str],
    prompt_format: str = "auto",
) -> str:
    """The prompt for ``turns[-1]`` after the earlier ``turns`` and their ``answers``.

    ``chat`` renders alternating user/assistant messages with the generation prompt. A plain-text format renders
    the first turn's prompt, then for each answer: the format's response prefix, the answer, a blank line and the
    next turn's follow-up prompt. A single turn is exactly :func:`format_prompt`.
    """
    if not turns:
        raise ValueError("`turns` is empty; pass at least the question to answer.")
    if len(answers) != len(turns) - 1:
        raise ValueError(f"Need one answer per earlier turn: got {len(turns)} turns and {len(answers)} answers.")
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    if fmt == "chat":
        messages = []
        for question, answer in zip(turns, [*answers, None]):
            messages.append({"role": "user", "content": question})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        return render(tokenizer, messages, add_generation_prompt=True)
    template = TEMPLATES[fmt]
    prompt = template.prompt(turns[0])
    for answer, question in zip(answers, turns[1:]):
        prompt += f"{template.response_prefix}{answer}{TURN_SEPARATOR}{template.follow_up.format(instruction=question)}"
    return prompt


def stop_strings(tokenizer: Optional[PreTrainedTokenizerBase], prompt_format: str) -> tuple[str, ...]:
    """Where an answer in this format ends at the latest: the start of an invented next turn (none for ``chat``,
    whose template ends a turn with a token)."""
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    return () if fmt == "chat" else TEMPLATES[fmt].stop
