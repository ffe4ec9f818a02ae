"""GSM8K-style exact-match accuracy: a metric, and a callback that measures the global model during training.

Any dataset whose answers are numbers works: GSM8K's ``"... #### 72"``, a plain ``"72"``, or an int.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torchmetrics import Metric
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from lightning_parablock.callback import ParaBlockCallback
from lightning_parablock.data.formatting import format_prompt
from lightning_parablock.eval.answers import Number, answers_match, extract_reference_answer
from lightning_parablock.eval.generation import generate_answers

if TYPE_CHECKING:
    import lightning.pytorch as pl

PromptFormat = Union[str, Callable[[str], str]]
"""A template with a ``{question}`` placeholder, or a function from question to prompt."""


class GSM8KAccuracy(Metric):
    """The fraction of predictions whose final number equals the reference's, as exact numbers.

    ``correct`` and ``total`` are sum-reduced states, so across processes (or merged with
    :meth:`merge_state`) the accuracy is that of all questions together, not a mean of per-process means.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[Union[str, Number]]) -> None:
        """Score model outputs (free text) against references (see :func:`extract_reference_answer`)."""
        if isinstance(predictions, str) or isinstance(references, str):
            raise TypeError("`predictions` and `references` must be sequences of answers, not a single str.")
        if len(predictions) != len(references):
            raise ValueError(
                f"Got {len(predictions)} predictions but {len(references)} references; pass one reference per"
                " prediction."
            )
        # rebinding, not +=: states reset under a Trainer's inference mode cannot be updated in place later
        self.correct = self.correct + sum(answers_match(p, ref) for p, ref in zip(predictions, references))
        self.total = self.total + len(predictions)

    def compute(self) -> torch.Tensor:
        """Accuracy in [0, 1]; ``nan`` before any question was scored."""
        return self.correct.double() / self.total

    @property
    def count(self) -> int:
        """Questions scored on this process (all processes inside :meth:`sync_context`)."""
        return int(self.total)


@dataclass
class GSM8KResult:
    """One evaluation of the model on the question set."""

    round: int  # the last round trained (0-based epoch), the step it is logged at, as ParaBlockCallback logs
    accuracy: float
    correct: int
    count: int
    final: bool  # at train end, after ParaBlockCallback's flush: the final global model
    generations: list[str]  # this process's outputs, in the order of its questions


def _prompt_fn(prompt_format: Optional[PromptFormat]) -> Callable[[str], str]:
    if prompt_format is None:
        return format_prompt
    if callable(prompt_format):
        return prompt_format
    if isinstance(prompt_format, str) and "{question}" in prompt_format:
        return lambda question: prompt_format.replace("{question}", question)
    raise ValueError(
        "`prompt_format` must be a function from question to prompt or a str with a '{question}' placeholder,"
        f" got {prompt_format!r}."
    )


class GSM8KEvaluation(Callback):
    """Generate greedy answers to a fixed question set and log exact-match accuracy during and after fit.

    Logs ``eval/gsm8k_accuracy`` and ``eval/gsm8k_count`` to the trainer's loggers at the Trainer's step, with the
    round (the 0-based epoch just trained) in the ``epoch`` column, and keeps every evaluation in :attr:`results`.
    Evaluations at round ends also reach ``trainer.callback_metrics``, so
    ``ModelCheckpoint(monitor="eval/gsm8k_accuracy")`` works.

    Order matters with ParaBlock: list this callback **after** :class:`~lightning_parablock.ParaBlockCallback`.
    At a round's end ParaBlockCallback puts the global model back in place of the last client's view and
    applies the round's aggregate; at train end it flushes the rounds still pending, after which the model is
    the final global one. A callback listed before it would see a client's view, or a model missing its last
    ``staleness`` aggregates, so :meth:`setup` refuses that order.

    With several processes each one answers its share of the questions and the counts are summed.

    Args:
        questions: The question texts. Without ``questions`` and ``answers`` the datamodule's
            ``eval_examples`` (``instruction`` / ``output``, e.g. FederatedDataModule's GSM8K test split)
            are used, so the callback can be set up from a YAML recipe.
        answers: One numeric reference per question (see :func:`extract_reference_answer`); all are
            checked before training starts.
        every_n_rounds: Also evaluate after every ``n``-th round. The last round is left to ``at_end``
            when that is set, whose model has the flushed aggregates.
        at_end: Evaluate the final global model at train end.
        prompt_format: How a question becomes a prompt: a function, or a string with a ``{question}``
            placeholder; by default the Alpaca template this package fine-tunes with.
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
        prompt_format: Optional[PromptFormat] = None,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        batch_size: int = 8,
        max_new_tokens: int = 256,
    ) -> None:
        if (questions is None) != (answers is None):
            raise ValueError(
                "Pass both `questions` and `answers`, or neither to evaluate on the datamodule's `eval_examples`."
            )
        if every_n_rounds is not None and (isinstance(every_n_rounds, bool) or every_n_rounds < 1):
            raise ValueError(f"`every_n_rounds` must be a positive integer or None, got {every_n_rounds!r}.")
        if every_n_rounds is None and not at_end:
            raise ValueError("With `every_n_rounds=None` and `at_end=False` GSM8KEvaluation would never evaluate.")
        self.questions: Optional[list[str]] = None
        self.answers: Optional[list[Union[str, Number]]] = None
        if questions is not None:
            self._set_examples(questions, answers)
        self.every_n_rounds = every_n_rounds
        self.at_end = at_end
        self.prompt_fn = _prompt_fn(prompt_format)
        self.tokenizer = tokenizer
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

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        callbacks = trainer.callbacks
        position = next(index for index, callback in enumerate(callbacks) if callback is self)
        if any(isinstance(callback, ParaBlockCallback) for callback in callbacks[position + 1 :]):
            raise MisconfigurationException(
                "GSM8KEvaluation is listed before ParaBlockCallback, so it would evaluate a client's view instead"
                " of the global model. Put it after ParaBlockCallback in `Trainer(callbacks=[...])`."
            )

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
        self._model(pl_module)  # fail now rather than after the first round
        self._tokenizer(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        round_index = trainer.current_epoch
        if self.every_n_rounds is None or (round_index + 1) % self.every_n_rounds:
            return
        if self.at_end and round_index + 1 == trainer.max_epochs:
            return
        result = self.evaluate(trainer, pl_module, round_index, final=False)
        metrics = {"eval/gsm8k_accuracy": result.accuracy, "eval/gsm8k_count": float(result.count)}
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, logger=False)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.at_end:
            self.evaluate(trainer, pl_module, max(trainer.current_epoch - 1, 0), final=True)

    def evaluate(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", round_index: int, final: bool
    ) -> GSM8KResult:
        """Answer this process's share of the questions, sum the counts over processes, log and keep the result."""
        shard = range(trainer.global_rank, len(self.questions), trainer.world_size)
        generations = generate_answers(
            self._model(pl_module),
            self._tokenizer(trainer, pl_module),
            [self.questions[index] for index in shard],
            self.prompt_fn,
            self.batch_size,
            self.max_new_tokens,
        )
        metric = GSM8KAccuracy().to(pl_module.device)
        metric.update(generations, [self.answers[index] for index in shard])
        with metric.sync_context():
            correct, count = int(metric.correct), metric.count
        result = GSM8KResult(round_index, correct / count, correct, count, final, generations)
        self.results.append(result)
        metrics = {"eval/gsm8k_accuracy": result.accuracy, "eval/gsm8k_count": count, "epoch": round_index}
        for logger in trainer.loggers:  # the Trainer's own step, so loggers never see it go backwards
            logger.log_metrics(metrics, step=trainer.global_step)
        return result

    def _model(self, pl_module: "pl.LightningModule") -> PreTrainedModel:
        model = getattr(pl_module, "hf_model", None)
        if model is None:
            model = getattr(pl_module, "model", None)
        if not callable(getattr(model, "generate", None)):
            raise MisconfigurationException(
                f"GSM8KEvaluation needs a Hugging Face model with `generate` at `{type(pl_module).__name__}.hf_model`"
                f" or `.model`, got {type(model).__name__}."
            )
        return model

    def _tokenizer(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> PreTrainedTokenizerBase:
        for owner in (self, trainer.datamodule, pl_module):
            tokenizer = getattr(owner, "tokenizer", None)
            if tokenizer is not None:
                return tokenizer
        raise MisconfigurationException(
            "GSM8KEvaluation found no tokenizer: pass `GSM8KEvaluation(tokenizer=...)` or give the datamodule or"
            f" the module a `tokenizer` attribute (datamodule: {type(trainer.datamodule).__name__},"
            f" module: {type(pl_module).__name__})."
        )
