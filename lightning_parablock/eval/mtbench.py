"""MT-Bench answers in FastChat's ``model_answer`` format, ready for FastChat's judge (which is not called here).

FastChat reads questions from ``data/mt_bench/question.jsonl`` and answers from
``data/mt_bench/model_answer/{model_id}.jsonl``, one JSON object per line::

    {"question_id": 81, "answer_id": "...", "model_id": "...", "choices": [{"index": 0, "turns": ["a1", "a2"]}],
     "tstamp": 1700000000.0}

Every turn is asked in the conversation so far: the second turn's prompt holds the first question and the
model's own first answer. Decoding is greedy for every category, so an export is reproducible; FastChat
samples writing and roleplay answers at temperature 0.7.
"""

import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_parablock.data.formatting import INSTRUCTION_HEADER, RESPONSE_HEADER, format_prompt
from lightning_parablock.data.sft_dataset import PromptFormat, resolve_prompt_format
from lightning_parablock.eval.generation import encode_prompt, generate_from_ids
from lightning_parablock.files import write_text_atomic

_REQUIRED = {"question_id": (int, str), "category": (str,), "turns": (list,)}


def load_mtbench_questions(path: Union[str, Path]) -> list[dict[str, Any]]:
    """Read an MT-Bench question file (jsonl: ``question_id``, ``category``, ``turns``), keeping any other fields."""
    questions: list[dict[str, Any]] = []
    seen: set[Union[int, str]] = set()
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                question = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON ({error.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(question, dict):
                raise ValueError(f"{where} must be a JSON object, got {type(question).__name__}.")
            for key, types in _REQUIRED.items():
                if not isinstance(question.get(key), types) or isinstance(question.get(key), bool):
                    accepted = " or ".join(t.__name__ for t in types)
                    raise ValueError(f"{where}: `{key}` must be of type {accepted}, got {question.get(key)!r}.")
            turns = question["turns"]
            if not turns or not all(isinstance(turn, str) and turn.strip() for turn in turns):
                raise ValueError(f"{where}: `turns` must be a non-empty list of non-empty strings, got {turns!r}.")
            if question["question_id"] in seen:
                raise ValueError(f"{where}: `question_id` {question['question_id']!r} appears twice.")
            seen.add(question["question_id"])
            questions.append(question)
    return questions


def conversation_prompt(
    tokenizer: PreTrainedTokenizerBase, turns: Sequence[str], answers: Sequence[str], prompt_format: PromptFormat = "auto"
) -> str:
    """The prompt for question ``turns[-1]``, after the earlier ``turns`` and the model's ``answers`` to them.

    ``prompt_format`` should be the one the model was fine-tuned with (FederatedDataModule's): ``chat``
    renders user/assistant messages with the tokenizer's chat template and the generation prompt;
    ``alpaca`` continues the Alpaca template: a single turn is exactly
    :func:`~lightning_parablock.data.format_prompt`, and each later turn appends the previous answer, a
    blank line, ``### Instruction:`` with the new question and ``### Response:``. ``auto`` is ``chat``
    when the tokenizer has a chat template.
    """
    if len(answers) != len(turns) - 1:
        raise ValueError(f"Need one answer per earlier turn: got {len(turns)} turns and {len(answers)} answers.")
    if resolve_prompt_format(tokenizer, prompt_format) == "chat":
        messages = []
        for question, answer in zip(turns, [*answers, None]):
            messages.append({"role": "user", "content": question})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = format_prompt(turns[0])
    for answer, question in zip(answers, turns[1:]):
        prompt += f"{answer}\n\n{INSTRUCTION_HEADER}{question}\n\n{RESPONSE_HEADER}"
    return prompt


def answer_mtbench(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[dict[str, Any]],
    model_id: str,
    batch_size: int = 8,
    max_new_tokens: int = 1024,
    prompt_format: PromptFormat = "auto",
) -> list[dict[str, Any]]:
    """Answer every turn of every question, turn by turn in batches, as FastChat ``model_answer`` records.

    The prompt of the last turn holds all earlier turns and answers, so the model's context must fit
    the questions plus ``max_new_tokens`` per turn.
    """
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"`model_id` must be a non-empty str (FastChat's name for the model), got {model_id!r}.")
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max((len(question["turns"]) for question in questions), default=0)):
        asked = [index for index, question in enumerate(questions) if len(question["turns"]) > turn]
        prompts = [
            encode_prompt(
                tokenizer, conversation_prompt(tokenizer, questions[i]["turns"][: turn + 1], answers[i], prompt_format)
            )
            for i in asked
        ]
        for index, text in zip(asked, generate_from_ids(model, tokenizer, prompts, batch_size, max_new_tokens)):
            answers[index].append(text.strip())
    return [
        {
            "question_id": question["question_id"],
            "answer_id": uuid.uuid4().hex,
            "model_id": model_id,
            "choices": [{"index": 0, "turns": turns}],
            "tstamp": time.time(),
        }
        for question, turns in zip(questions, answers)
    ]


def write_jsonl_atomic(records: Sequence[dict[str, Any]], path: Union[str, Path]) -> Path:
    """Write one JSON object per line, atomically: a crash or a record that is not JSON-serializable leaves
    ``path`` as it was (absent or the previous file), never half-written."""
    return write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def export_mtbench_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    question_file: Union[str, Path],
    answer_file: Union[str, Path],
    model_id: str,
    batch_size: int = 8,
    max_new_tokens: int = 1024,
    prompt_format: PromptFormat = "auto",
) -> list[dict[str, Any]]:
    """Read ``question_file``, answer every turn greedily and write FastChat's ``answer_file`` atomically.

    For FastChat's judge, ``answer_file`` is ``data/mt_bench/model_answer/{model_id}.jsonl``.

    Returns:
        The records written, in the question file's order.
    """
    questions = load_mtbench_questions(question_file)
    records = answer_mtbench(model, tokenizer, questions, model_id, batch_size, max_new_tokens, prompt_format)
    write_jsonl_atomic(records, answer_file)
    return records
