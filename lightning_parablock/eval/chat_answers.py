"""Accuracy on your own chat data: answer each conversation's last question and score it against its last answer.

A ``messages`` file (JSON lines, or one JSON list; ShareGPT's ``conversations`` too) gives the examples: in each
conversation the last assistant turn is the reference and everything before it is the prompt, rendered with the
tokenizer's chat template and its generation prompt, tokenized as training tokenizes it. Answers are greedy and
batched, cut at the template's end of turn. A :class:`AnswerMatch` scores them: exact match (surrounding
whitespace ignored), or equality of what a regular expression finds in the answer and in the reference (its
group ``answer``, else its first group, else the whole match; a reference where it finds nothing is refused
before anything is generated). Used by ``parablock evaluate`` (a saved model) and by :class:`ChatEvaluation`
(the global model during training).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from lightning_parablock.data.chat import CHAT_COLUMNS, check_chat_template, check_conversation
from lightning_parablock.eval.accuracy import MatchAccuracy
from lightning_parablock.eval.generation import cut_at_stop, generate_token_ids
from lightning_parablock.eval.global_model import GlobalModelEvaluation

if TYPE_CHECKING:
    import lightning.pytorch as pl

_SENTINEL = "\u2063answer\u2063"  # text no template rewrites, to find what a template writes after an answer


@dataclass(frozen=True)
class ChatExample:
    """One conversation cut at its last assistant turn: the turns before it, and that turn's text."""

    prompt: list[dict[str, str]]
    reference: str
    row: int  # 0-based, in the file


class AnswerMatch:
    """Whether an answer is right: exact match, or the same text found by ``pattern`` in answer and reference."""

    def __init__(self, pattern: Optional[str] = None) -> None:
        if pattern is not None and not isinstance(pattern, str):
            raise TypeError(f"`pattern` must be a regular expression (a str) or None for exact match, got {pattern!r}.")
        try:
            self.regex = None if pattern is None else re.compile(pattern)
        except re.error as error:
            raise ValueError(f"`pattern` {pattern!r} is not a regular expression: {error}.") from None
        self.pattern = pattern

    def __repr__(self) -> str:
        return "exact match" if self.pattern is None else f"pattern {self.pattern!r}"

    def extract(self, text: str) -> Optional[str]:
        """The part of ``text`` compared: all of it (stripped), or what the pattern finds (``None``: nothing)."""
        if self.regex is None:
            return text.strip()
        found = self.regex.search(text)
        if found is None:
            return None
        if "answer" in self.regex.groupindex:
            value = found.group("answer")
        else:
            value = found.group(1) if self.regex.groups else found.group(0)
        return None if value is None else value.strip()

    def check_references(self, examples: Sequence[ChatExample], where: str) -> None:
        """Refuse, before generating, a reference in which the pattern finds nothing to compare with."""
        for example in examples:
            if self.extract(example.reference) is None:
                raise ValueError(
                    f"{where}, row {example.row}: {self!r} finds nothing in the reference answer"
                    f" {example.reference[:200]!r}; give a pattern that matches every reference."
                )

    def __call__(self, answer: str, reference: str) -> bool:
        extracted = self.extract(answer)
        return extracted is not None and extracted == self.extract(reference)


def load_chat_examples(path: Union[str, Path], limit: Optional[int] = None) -> list[ChatExample]:
    """The conversations of a ``messages`` (or ShareGPT ``conversations``) file, each cut at its last assistant
    turn; refused naming the file and row when a row has no conversation, no user turn before its last answer, or
    a malformed turn."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"The chat file {str(path)!r} does not exist (a JSON lines file with a `messages` column)."
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` must be a positive number of conversations or None, got {limit!r}.")
    examples = []
    for row, record in enumerate(_records(path)):
        if limit is not None and len(examples) == limit:
            break
        column = next((c for c in CHAT_COLUMNS if isinstance(record, dict) and c in record), None)
        if column is None:
            raise ValueError(
                f"{path}, row {row}: no `messages` (or `conversations`) list of turns, got {str(record)[:200]}."
            )
        turns = check_conversation(record[column], f"{path}, row {row}")
        last = max(index for index, turn in enumerate(turns) if turn["role"] == "assistant")  # after a user turn
        examples.append(ChatExample(turns[:last], turns[last]["content"], row))
    if not examples:
        raise ValueError(f"The chat file {str(path)!r} holds no conversation.")
    return examples


def _records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}.") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not a JSON object ({error}).") from None
    return records


def turn_end(tokenizer: PreTrainedTokenizerBase) -> Optional[str]:
    """What the chat template writes right after an assistant's answer (``<|im_end|>``, ``<|eot_id|>``), if anything."""
    turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    after = rendered[rendered.index(_SENTINEL) + len(_SENTINEL) :].split() if _SENTINEL in rendered else []
    return after[0] if after else None


def check_chat_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer without a chat template: the prompts could not be rendered as training rendered them."""
    check_chat_template(tokenizer, "give the tokenizer the model was fine-tuned with (it is saved beside the model).")


def answer_conversations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict[str, str]]],
    batch_size: int = 8,
    max_new_tokens: int = 256,
) -> list[str]:
    """Greedy answers to the conversations ``prompts``, rendered with the chat template and its generation prompt,
    cut at the template's end of turn or the eos token, without special tokens, stripped; in input order."""
    check_chat_tokenizer(tokenizer)
    texts = [tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True) for turns in prompts]
    prompt_ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]  # as training tokenizes
    stop = [marker for marker in (turn_end(tokenizer), tokenizer.eos_token) if marker]
    generated = generate_token_ids(model, tokenizer, prompt_ids, batch_size, max_new_tokens, stop)
    answers = []
    for text in tokenizer.batch_decode(generated, skip_special_tokens=False):
        text = cut_at_stop(text, stop)
        for special in tokenizer.all_special_tokens:
            text = text.replace(special, "")
        answers.append(text.strip())
    return answers


@dataclass
class ChatScore:
    """The answers to a chat file and how many were right."""

    correct: int
    count: int
    rows: list[dict[str, Any]] = field(default_factory=list)  # per example: row, reference, answer, correct

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else float("nan")


def score_chat(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ChatExample],
    match: AnswerMatch,
    batch_size: int = 8,
    max_new_tokens: int = 256,
) -> ChatScore:
    """Answer every example and score the answers with ``match``."""
    answers = answer_conversations(model, tokenizer, [e.prompt for e in examples], batch_size, max_new_tokens)
    rows = [
        {"row": e.row, "reference": e.reference, "answer": a, "correct": match(a, e.reference)}
        | ({} if match.pattern is None else {"extracted": match.extract(a), "expected": match.extract(e.reference)})
        for e, a in zip(examples, answers)
    ]
    return ChatScore(sum(r["correct"] for r in rows), len(rows), rows)


class ChatEvaluation(GlobalModelEvaluation):
    """Accuracy of the global model on a ``messages`` file, every ``every_n_rounds`` rounds and at train end.

    Logs ``eval/chat_accuracy`` and ``eval/chat_count`` and keeps every evaluation in :attr:`results`; list it
    **after** :class:`~lightning_parablock.ParaBlockCallback`. With several processes each answers its share of
    the conversations and the counts are summed.

    Args:
        data_file: a JSON lines file with a ``messages`` column (see :func:`load_chat_examples`); checked now.
        pattern: a regular expression whose find in the answer must equal its find in the reference; ``None``
            for exact match.
        every_n_rounds: also evaluate after every ``n``-th round.
        at_end: evaluate the final global model at train end.
        limit: the first ``limit`` conversations only.
        tokenizer: by default the datamodule's or the module's ``tokenizer`` attribute.
        batch_size: conversations per ``generate`` call.
        max_new_tokens: longest answer, in tokens.
    """

    def __init__(
        self,
        data_file: Union[str, Path],
        pattern: Optional[str] = None,
        every_n_rounds: Optional[int] = None,
        at_end: bool = True,
        limit: Optional[int] = None,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        batch_size: int = 8,
        max_new_tokens: int = 256,
    ) -> None:
        super().__init__(every_n_rounds, at_end, tokenizer)
        self.match = AnswerMatch(pattern)
        self.examples = load_chat_examples(data_file, limit)
        self.match.check_references(self.examples, str(data_file))
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.results: list[ChatScore] = []

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.hf_model(pl_module)  # fail now rather than after the first round
        check_chat_tokenizer(self.find_tokenizer(trainer, pl_module))

    @override
    def evaluate(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", round_index: int, final: bool
    ) -> dict[str, float]:
        """Answer this process's share, sum the counts over processes and keep this process's answers."""
        shard = self.examples[trainer.global_rank :: trainer.world_size]
        tokenizer = self.find_tokenizer(trainer, pl_module)
        score = score_chat(self.hf_model(pl_module), tokenizer, shard, self.match, self.batch_size, self.max_new_tokens)
        metric = MatchAccuracy().to(pl_module.device)
        metric.update([row["correct"] for row in score.rows])
        with metric.sync_context():
            correct, count = int(metric.correct), metric.count
        self.results.append(ChatScore(correct, count, score.rows))
        return {"eval/chat_accuracy": correct / count, "eval/chat_count": float(count)}
