"""GSM8K-style exact-match accuracy: a metric, and a fast callback that monitors the global model during training.

Any dataset whose answers are numbers works: GSM8K's ``"... #### 72"``, a plain ``"72"``, or an int. This is this
package's own protocol (the fine-tuning prompt format, greedy, a lenient numeric extraction); for the Open LLM
Leaderboard's GSM8K (lm-evaluation-harness, 5-shot, strict and flexible matching) use
:class:`~lightning_parablock.eval.LMEvalHarness`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_parablock.data.prompts import (
    PROMPT_FORMATS,
    PromptFormat,
    check_prompt_format,
    conversation_prompt,
    resolve_prompt_format,
    stop_strings,
)
from lightning_parablock.eval.accuracy import MatchAccuracy
from lightning_parablock.eval.answers import Number, answers_match, extract_reference_answer
from lightning_parablock.eval.generation import generate_answers
from lightning_parablock.eval.global_model import GlobalModelEvaluation

if TYPE_CHECKING:
    import lightning.pytorch as pl

QuestionPrompt = Union[PromptFormat, Callable[[str], str]]
"""A prompt format's name (see :mod:`~lightning_parablock.data.prompts`), or a function from question to prompt."""


class GSM8KAccuracy(MatchAccuracy):
    """The fraction of predictions whose final number equals the reference's, as exact numbers.

    ``correct`` and ``total`` are sum-reduced states, so across processes (or merged with
    :meth:`merge_state`) the accuracy is that of all questions together, not a mean of per-process means.
    """

    def update(  # type: ignore[override]
        self, predictions: Sequence[str], references: Sequence[Union[str, Number]]
    ) -> None:
        """Score model outputs (free text) against references (see :func:`extract_reference_answer`)."""
        if isinstance(predictions, str) or isinstance(references, str):
            raise TypeError("`predictions` and `references` must be sequences of answers, not a single str.")
        if len(predictions) != len(references):
            raise ValueError(
                f"Got {len(predictions)} predictions but {len(references)} references; pass one reference per"
                " prediction."
            )
        super().update([answers_match(p, ref) for p, ref in zip(predictions, references)])


@dataclass
class GSM8KResult:
    """One evaluation of the model on the question set."""

    round: int  # the last round trained (0-based epoch), the step it is logged at, as ParaBlockCallback logs
    accuracy: float
    correct: int
    count: int
    final: bool  # at train end, after ParaBlockCallback's flush: the final global model
    generations: list[str]  # this process's outputs, in the order of its questions


class GSM8KEvaluation(GlobalModelEvaluation):
    """Generate answers to a fixed question set and log exact-match accuracy during and after fit.

    Logs ``eval/gsm8k_accuracy`` and ``eval/gsm8k_count`` and keeps every evaluation in :attr:`results`. List it
    **after** :class:`~lightning_parablock.ParaBlockCallback` (see :mod:`~lightning_parablock.eval.global_model`).
    With several processes each one answers its share of the questions and the counts are summed.

    By default a question is asked zero-shot in the format the model was fine-tuned with and the answer is read
    leniently (:func:`extract_numeric_answer`). The Open LLM Leaderboard's prompt is
    ``prompt_format="question_answer"`` with five ``fewshot`` pairs from GSM8K's train split: generation then stops
    at ``Question:`` as lm-evaluation-harness's does (its strict/flexible scoring: :class:`LMEvalHarness`).

    Args:
        questions: The question texts. Without ``questions`` and ``answers`` the datamodule's
            ``eval_examples`` (``instruction`` / ``output``, e.g. FederatedDataModule's GSM8K test split)
            are used, so the callback can be set up from a YAML recipe.
        answers: One numeric reference per question (see :func:`extract_reference_answer`); all are
            checked before training starts.
        every_n_rounds: Also evaluate after every ``n``-th round.
        at_end: Evaluate the final global model at train end.
        prompt_format: A prompt format (``alpaca_lora``, ``stanford_alpaca``, ``question_answer``, ``chat``,
            ``auto``), or a function from question to prompt. By default the datamodule's ``prompt_format`` (the
            one the model is fine-tuned with), else ``auto``.
        fewshot: ``(question, answer)`` pairs asked and answered before each question, as earlier turns of the
            conversation in ``prompt_format``.
        stop: Strings that end an answer (cut before the first one); by default the format's own turn marker
            (``### Instruction:`` for the Alpaca formats, ``Question:`` for ``question_answer``).
        tokenizer: By default the datamodule's or the module's ``tokenizer`` attribute.
        batch_size: Prompts per ``generate`` call.
        max_new_tokens: Longest answer, in tokens.
    """

    def __init__(
        self,
        questions: Optional[Sequence[str]] = None,
        answers: Optional[Sequence[Union[str, Number]]] = None,
        every_n_rounds: Optional[int] = None,
        at_end: bool = True,
        prompt_format: Optional[QuestionPrompt] = None,
        fewshot: Sequence[tuple[str, str]] = (),
        stop: Optional[Sequence[str]] = None,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        batch_size: int = 8,
        max_new_tokens: int = 256,
    ) -> None:
        super().__init__(every_n_rounds, at_end, tokenizer)
        if (questions is None) != (answers is None):
            raise ValueError(
                "Pass both `questions` and `answers`, or neither to evaluate on the datamodule's `eval_examples`."
            )
        if isinstance(prompt_format, str):
            check_prompt_format(prompt_format)
        elif prompt_format is not None and not callable(prompt_format):
            raise ValueError(
                f"`prompt_format` must be one of {PROMPT_FORMATS} or a function from question to prompt, got"
                f" {prompt_format!r}."
            )
        if callable(prompt_format) and fewshot:
            raise ValueError("`fewshot` needs a named `prompt_format`; a prompt function writes its own examples.")
        if any(isinstance(pair, str) or len(pair) != 2 for pair in fewshot):
            raise ValueError(f"`fewshot` must be (question, answer) pairs, got {list(fewshot)!r}.")
        self.questions: Optional[list[str]] = None
        self.answers: Optional[list[Union[str, Number]]] = None
        if questions is not None:
            self._set_examples(questions, answers)
        self.prompt_format = prompt_format
        self.fewshot = [(str(question), str(answer)) for question, answer in fewshot]
        self.stop = None if stop is None else list(stop)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.results: list[GSM8KResult] = []

    def _set_examples(self, questions: Sequence[str], answers: Sequence[Union[str, Number]]) -> None:
        """Check every reference now, so a bad one fails before training rather than at the first evaluation."""
        if len(questions) != len(answers):
            raise ValueError(f"Got {len(questions)} questions but {len(answers)} answers; pass one per question.")
        if not questions:
            raise ValueError("`questions` is empty; pass at least one question to evaluate on.")
        for index, answer in enumerate(answers):
            try:
                extract_reference_answer(answer)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"Answer {index} (for question {questions[index]!r}) is not numeric: {error}"
                ) from None
        self.questions, self.answers = list(questions), list(answers)

    @classmethod
    def from_dataset(
        cls, dataset: Any, question_column: str = "question", answer_column: str = "answer", **kwargs: Any
    ) -> "GSM8KEvaluation":
        """From any table with a question and a numeric answer column (``datasets.Dataset``, dict of lists)."""
        columns = list(getattr(dataset, "column_names", None) or dataset.keys())
        missing = [name for name in (question_column, answer_column) if name not in columns]
        if missing:
            raise ValueError(f"The dataset has no column {missing[0]!r}; its columns are {columns}.")
        return cls(list(dataset[question_column]), list(dataset[answer_column]), **kwargs)

    def prompt_and_stop(
        self, tokenizer: PreTrainedTokenizerBase, datamodule: Any = None
    ) -> tuple[Callable[[str], str], list[str]]:
        """How a question becomes a prompt, and where its answer ends, for this tokenizer and datamodule."""
        prompt_format = self.prompt_format
        if prompt_format is None:
            prompt_format = getattr(getattr(datamodule, "hparams", None), "prompt_format", None) or "auto"
        if callable(prompt_format):
            return prompt_format, list(self.stop or [])
        fmt = resolve_prompt_format(tokenizer, prompt_format)
        shots = [question for question, _ in self.fewshot]
        shown = [answer for _, answer in self.fewshot]

        def prompt(question: str) -> str:
            return conversation_prompt(tokenizer, [*shots, question], shown, fmt)

        return prompt, list(stop_strings(tokenizer, fmt) if self.stop is None else self.stop)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.questions is None:
            examples = getattr(trainer.datamodule, "eval_examples", None)
            if examples is None:
                raise MisconfigurationException(
                    "GSM8KEvaluation got no questions and the datamodule has no `eval_examples` (a"
                    " FederatedDataModule with `eval_dataset=...`); pass `questions` and `answers`."
                )
            self._set_examples(list(examples["instruction"]), list(examples["output"]))
        self.hf_model(pl_module)  # fail now rather than after the first round
        self.prompt_and_stop(self.find_tokenizer(trainer, pl_module), trainer.datamodule)

    @override
    def evaluate(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", round_index: int, final: bool
    ) -> dict[str, float]:
        """Answer this process's share of the questions, sum the counts over processes and keep the result."""
        tokenizer = self.find_tokenizer(trainer, pl_module)
        prompt_fn, stop = self.prompt_and_stop(tokenizer, trainer.datamodule)
        shard = range(trainer.global_rank, len(self.questions), trainer.world_size)
        generations = generate_answers(
            self.hf_model(pl_module),
            tokenizer,
            [self.questions[index] for index in shard],
            prompt_fn,
            self.batch_size,
            self.max_new_tokens,
            stop,
        )
        metric = GSM8KAccuracy().to(pl_module.device)
        metric.update(generations, [self.answers[index] for index in shard])
        with metric.sync_context():
            correct, count = int(metric.correct), metric.count
        result = GSM8KResult(round_index, correct / count, correct, count, final, generations)
        self.results.append(result)
        return {"eval/gsm8k_accuracy": result.accuracy, "eval/gsm8k_count": float(count)}
