"""When and on which model an evaluation callback runs: the global model, every n rounds and at train end.

With ParaBlock the model in memory is a client's view during a round. At a round's end
:class:`~lightning_parablock.ParaBlockCallback` puts the global model back and applies the round's aggregate; at
train end it flushes the rounds still pending. An evaluation listed after it therefore sees the global model; one
listed before it would not, so that order is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from lightning_parablock.callbacks.parablock import ParaBlockCallback

if TYPE_CHECKING:
    import lightning.pytorch as pl


class GlobalModelEvaluation(Callback):
    """Base of the evaluation callbacks: calls :meth:`evaluate` after every ``every_n_rounds``-th round and at
    train end, and logs what it returns.

    Metrics go to the trainer's loggers at the Trainer's step, with the round (the 0-based epoch just trained) in
    the ``epoch`` column. Evaluations at round ends also reach ``trainer.callback_metrics``, so
    ``ModelCheckpoint(monitor=...)`` works. The last round is left to ``at_end`` when that is set, whose model has
    the flushed aggregates.
    """

    def __init__(self, every_n_rounds: Optional[int], at_end: bool, tokenizer: Optional[PreTrainedTokenizerBase]):
        if every_n_rounds is not None and (isinstance(every_n_rounds, bool) or every_n_rounds < 1):
            raise ValueError(f"`every_n_rounds` must be a positive integer or None, got {every_n_rounds!r}.")
        if every_n_rounds is None and not at_end:
            raise ValueError(
                f"With `every_n_rounds=None` and `at_end=False` {type(self).__name__} would never evaluate."
            )
        self.every_n_rounds = every_n_rounds
        self.at_end = at_end
        self.tokenizer = tokenizer

    def evaluate(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", round_index: int, final: bool
    ) -> dict[str, float]:
        """Evaluate the model now; the metrics to log, the same on every process."""
        raise NotImplementedError

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        callbacks = trainer.callbacks
        position = next(index for index, callback in enumerate(callbacks) if callback is self)
        if any(isinstance(callback, ParaBlockCallback) for callback in callbacks[position + 1 :]):
            raise MisconfigurationException(
                f"{type(self).__name__} is listed before ParaBlockCallback, so it would evaluate a client's view"
                " instead of the global model. Put it after ParaBlockCallback in `Trainer(callbacks=[...])`."
            )

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        round_index = trainer.current_epoch
        if self.every_n_rounds is None or (round_index + 1) % self.every_n_rounds:
            return
        if self.at_end and round_index + 1 == trainer.max_epochs:
            return
        metrics = self._evaluate_and_log(trainer, pl_module, round_index, final=False)
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, logger=False)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.at_end:
            self._evaluate_and_log(trainer, pl_module, max(trainer.current_epoch - 1, 0), final=True)

    def _evaluate_and_log(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", round_index: int, final: bool
    ) -> dict[str, float]:
        metrics = self.evaluate(trainer, pl_module, round_index, final)
        for logger in trainer.loggers:  # the Trainer's own step, so loggers never see it go backwards
            logger.log_metrics({**metrics, "epoch": round_index}, step=trainer.global_step)
        return metrics

    def hf_model(self, pl_module: "pl.LightningModule") -> PreTrainedModel:
        """The module's Hugging Face model: ``hf_model``, else ``model``."""
        model = getattr(pl_module, "hf_model", None)
        if model is None:
            model = getattr(pl_module, "model", None)
        if not callable(getattr(model, "generate", None)):
            raise MisconfigurationException(
                f"{type(self).__name__} needs a Hugging Face model with `generate` at"
                f" `{type(pl_module).__name__}.hf_model` or `.model`, got {type(model).__name__}."
            )
        return model

    def find_tokenizer(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> PreTrainedTokenizerBase:
        """The callback's tokenizer, else the datamodule's, else the module's."""
        for owner in (self, trainer.datamodule, pl_module):
            tokenizer = getattr(owner, "tokenizer", None)
            if tokenizer is not None:
                return tokenizer
        raise MisconfigurationException(
            f"{type(self).__name__} found no tokenizer: pass `{type(self).__name__}(tokenizer=...)` or give the"
            f" datamodule or the module a `tokenizer` attribute (datamodule: {type(trainer.datamodule).__name__},"
            f" module: {type(pl_module).__name__})."
        )
