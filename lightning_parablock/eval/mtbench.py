"""MT-Bench answers in FastChat's ``model_answer`` format, ready for FastChat's judge (which is not called here).

FastChat reads questions from ``data/mt_bench/question.jsonl`` and answers from
``data/mt_bench/model_answer/{model_id}.jsonl``, one JSON object per line::

    {"question_id": 81, "answer_id": "...", "model_id": "...", "choices": [{"index": 0, "turns": ["a1", "a2"]}],
     "tstamp": 1700000000.0}

Every turn is asked in the conversation so far: the second turn's prompt holds the first question and the
model's own first answer. Decoding follows FastChat's ``gen_model_answer``: each category's temperature from its
``temperature_config`` (writing and roleplay 0.7, STEM and humanities 0.1, the rest greedy; 0.7 for a category it
does not list), sampling seeded with ``torch.manual_seed(0)`` at each sampled question (its first choice), and the
same clean-up of each answer (:func:`fastchat_output`). ``greedy=True`` answers every category greedily, for an
export that is a pure function of the weights.
"""

import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_parablock.data.prompts import PromptFormat, conversation_prompt, resolve_prompt_format, stop_strings
from lightning_parablock.eval.generation import encode_prompt, generate_token_ids
from lightning_parablock.files import write_text_atomic

FASTCHAT_TEMPERATURES = {
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
"""FastChat's ``fastchat/llm_judge/common.py`` ``temperature_config``."""
FASTCHAT_DEFAULT_TEMPERATURE = 0.7
"""What ``gen_model_answer`` samples a category at that the table does not list."""
_GREEDY_BELOW = 1e-4
"""``gen_model_answer`` decodes greedily below this temperature."""

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


def question_temperature(question: dict[str, Any], greedy: bool = False) -> float:
    """FastChat's sampling temperature for the question's category (0 for every question when ``greedy``)."""
    if greedy:
        return 0.0
    return FASTCHAT_TEMPERATURES.get(question["category"], FASTCHAT_DEFAULT_TEMPERATURE)


def fastchat_output(
    token_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase, stop_token_ids: set[int], stop: Sequence[str]
) -> str:
    """An answer's text from its generated tokens, as FastChat's ``gen_model_answer`` cleans it up.

    Cut at the first stop token; decode; cut at the earliest ``stop`` string found *after* the first character
    (FastChat's ``output.find(stop_str) > 0``); remove the text of every special token; strip whitespace.
    """
    ids = list(token_ids)
    cut = next((index for index, token in enumerate(ids) if token in stop_token_ids), len(ids))
    output = tokenizer.decode(ids[:cut], spaces_between_special_tokens=False)
    found = sorted(position for term in stop if (position := output.find(term)) > 0)
    if found:
        output = output[: found[0]]
    for special in tokenizer.special_tokens_map.values():
        for token in special if isinstance(special, list) else [special]:
            output = output.replace(token, "")
    return output.strip()


def _stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end a turn: the tokenizer's eos and the model's generation eos (a chat model's end of turn)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return {token for token in [tokenizer.eos_token_id, *ids] if token is not None}


def answer_mtbench(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[dict[str, Any]],
    model_id: str,
    batch_size: int = 8,
    max_new_tokens: int = 1024,
    prompt_format: PromptFormat = "auto",
    greedy: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Answer every turn of every question as FastChat ``model_answer`` records, in the questions' order.

    Greedy questions are answered turn by turn in batches; sampled ones one at a time, with ``torch.manual_seed(
    seed)`` before each question's first turn as FastChat seeds its first choice (the caller's random state is
    restored afterwards). The prompt of the last turn holds all earlier turns and answers, so the model's context
    must fit the questions plus ``max_new_tokens`` per turn.
    """
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"`model_id` must be a non-empty str (FastChat's name for the model), got {model_id!r}.")
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    stop, stop_ids = stop_strings(tokenizer, fmt), _stop_token_ids(model, tokenizer)
    temperatures = [question_temperature(question, greedy) for question in questions]
    answers: list[list[str]] = [[] for _ in questions]

    def answer_turn(asked: Sequence[int], turn: int, size: int, temperature: float) -> None:
        prompts = [
            encode_prompt(tokenizer, conversation_prompt(tokenizer, questions[i]["turns"][: turn + 1], answers[i], fmt))
            for i in asked
        ]
        # no early stop at `stop`: FastChat generates to the end, then cuts only at a stop string after position 0
        generated = generate_token_ids(model, tokenizer, prompts, size, max_new_tokens, (), temperature)
        for index, ids in zip(asked, generated):
            answers[index].append(fastchat_output(ids, tokenizer, stop_ids, stop))

    greedy_rows = [index for index, temperature in enumerate(temperatures) if temperature < _GREEDY_BELOW]
    for turn in range(max((len(questions[i]["turns"]) for i in greedy_rows), default=0)):
        answer_turn([i for i in greedy_rows if len(questions[i]["turns"]) > turn], turn, batch_size, 0.0)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for index, temperature in enumerate(temperatures):
            if temperature >= _GREEDY_BELOW:
                torch.manual_seed(seed)
                for turn in range(len(questions[index]["turns"])):
                    answer_turn([index], turn, 1, temperature)
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
    greedy: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Read ``question_file``, answer every turn as :func:`answer_mtbench` and write FastChat's ``answer_file``
    atomically.

    For FastChat's judge, ``answer_file`` is ``data/mt_bench/model_answer/{model_id}.jsonl``.

    Returns:
        The records written, in the question file's order.
    """
    questions = load_mtbench_questions(question_file)
    records = answer_mtbench(
        model, tokenizer, questions, model_id, batch_size, max_new_tokens, prompt_format, greedy, seed
    )
    write_jsonl_atomic(records, answer_file)
    return records
