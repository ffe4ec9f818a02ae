"""``ParaBlockCallback``: when block deltas are exchanged, and what each round cost.

The callback builds the run's :class:`~lightning_parablock.strategies.exchange_spec.ExchangeSpec` from its
arguments and hands it to the strategy at setup; from then on it drives rounds through the strategy's round
protocol and reads nothing else of it. At the start of round ``t`` it starts the exchange of round ``t − s``; the
clients train round ``t`` meanwhile. At the end of round ``t`` it finishes that exchange (the *exposed* wait and the
correction are the strategy's), and records what the round cost. After the last round it flushes the ``s`` rounds
still pending, synchronously, and writes the final global model to ``final.ckpt`` beside each checkpoint folder.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_parablock._compat import progress_bar_metrics
from lightning_parablock.aggregation.aggregator import Aggregator, Weighting
from lightning_parablock.aggregation.mean import MeanAggregator
from lightning_parablock.callbacks.final_checkpoint import save_final_checkpoints
from lightning_parablock.callbacks.round_line import print_round_line
from lightning_parablock.comm.by_processes import ByProcesses
from lightning_parablock.comm.codecs import Codec, make_codec
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.comm.transport import TransportChoice
from lightning_parablock.methods.registry import Method, identify
from lightning_parablock.methods.registry import method as method_settings
from lightning_parablock.strategies.client_exchange import ExchangeOutcome
from lightning_parablock.strategies.exchange_spec import ExchangeSpec
from lightning_parablock.strategies.federated_block import FederatedBlockStrategy
from lightning_parablock.strategies.trainer_checks import check_staleness, check_trainer
from lightning_parablock.strategies.turns import RoundState
from lightning_parablock.telemetry.timeline import (
    TIMELINE_FILENAME,
    RoundRecord,
    RunSummary,
    record_from_json,
    run_folder,
    save_timeline,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl


class ParaBlockCallback(Callback):
    """Runs ParaBlock's communication in the background and applies the round boundary.

    Args:
        staleness: rounds between training a block and aggregating it. ``0`` is FedBCD (train,
            then exchange, synchronously), ``1`` is ParaBlock (exchange round ``t − 1`` while
            training round ``t``), ``k ≥ 2`` the paper's multi-round staleness. ``None`` (the default)
            is ``1``; it leaves the choice to a recipe's ``method`` (see :mod:`lightning_parablock.cli.recipe_method`).
        link: the modelled link; by default an infinitely fast one (only real work is timed).
        aggregator: how the server combines deltas; by default the weighted mean of the paper
            (:class:`~lightning_parablock.aggregation.mean.MeanAggregator`), raising on a non-finite delta. The robust
            rules are ``MedianAggregator`` and ``TrimmedMeanAggregator``; each takes ``nonfinite="skip"`` to leave
            non-finite clients out.
        comm_timeout: longest wait at a boundary for one exchange before it counts as failed, in
            seconds or as a string such as ``"600s"``.
        compression: how clients' deltas go up the link: ``"none"`` (fp32), ``"bf16"``, ``"int8"`` (a scale
            per row), ``"int8-block"`` (a scale per 256 values), ``"topk"`` (10% of the entries, with error
            feedback), or a :class:`~lightning_parablock.comm.codecs.Codec`. The server decodes to fp32 before
            aggregating; the bytes counted are the encoded ones. Works with every transport.
        transport: which transport carries the exchange; by default in memory with one process and
            torch.distributed collectives with several (:class:`~lightning_parablock.comm.by_processes.ByProcesses`).
    """

    def __init__(
        self,
        staleness: Optional[int] = None,
        link: Optional[SimulatedLink] = None,
        aggregator: Optional[Aggregator] = None,
        comm_timeout: float | str = 1800.0,
        compression: Union[str, Codec, None] = "none",
        transport: Optional[TransportChoice] = None,
    ) -> None:
        self.staleness = 1 if staleness is None else staleness
        self.aggregator = aggregator if aggregator is not None else MeanAggregator()
        self.codec = make_codec(compression)
        self.link = link if link is not None else SimulatedLink()
        self.comm_timeout = comm_timeout  # parsed by the spec, and taken back from it just below
        self.transport = transport if transport is not None else ByProcesses()
        self._take_checked(self.spec)  # every value refused by name now, not when training starts
        self.records: list[RoundRecord] = []
        self._timeline_path: Optional[Path] = None
        self._round_started_at = 0.0
        self._round: Optional[RoundState] = None  # what the strategy said of the round in progress
        self._client_loss: dict[int, list[Tensor]] = {}  # client -> its micro-batches' losses this round
        self._client_steps: dict[int, list[int]] = {}  # client -> the Trainer step of each of its optimizer steps
        self._shown_client: Optional[int] = None  # the client the progress bar names

    @classmethod
    def for_method(cls, method: Union[str, Method], weighting: Weighting = "uniform", **kwargs: Any) -> "ParaBlockCallback":
        """The callback of one of the paper's Table 1 methods (``"fedit"``, ...): its staleness and aggregator,
        weighting clients by ``weighting`` (``"uniform"`` or ``"samples"``).

        ``kwargs`` are the other arguments (``link``, ``comm_timeout``, ``compression``, ``transport``).
        """
        spec = method if isinstance(method, Method) else method_settings(method)
        return cls(**spec.callback_args(weighting), **kwargs)

    @property
    def spec(self) -> ExchangeSpec:
        """The exchange these arguments describe, checked (the strategy receives it at setup). Built from the
        attributes each time, so ``callback.link = SimulatedLink(...)`` between fits takes effect."""
        return ExchangeSpec(
            staleness=self.staleness,
            aggregator=self.aggregator,
            codec=self.codec,
            link=self.link,
            comm_timeout=self.comm_timeout,
            transport=self.transport,
        )

    def _take_checked(self, spec: ExchangeSpec) -> None:
        """The values as the spec normalized them (a staleness of ``2.0`` is 2, ``"90s"`` is 90.0)."""
        self.staleness, self.comm_timeout = spec.staleness, spec.comm_timeout

    def _strategy(self, trainer: "pl.Trainer") -> FederatedBlockStrategy:
        strategy = trainer.strategy
        if not isinstance(strategy, FederatedBlockStrategy):
            raise MisconfigurationException(
                f"ParaBlockCallback needs `Trainer(strategy=FederatedBlockStrategy(...))`, got"
                f" {type(strategy).__name__}."
            )
        return strategy

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        strategy = self._strategy(trainer)
        check_trainer(trainer)
        _check_listed_before(self, LearningRateMonitor, trainer.callbacks)
        spec = self.spec
        self._take_checked(spec)
        check_staleness(trainer, spec.staleness)
        strategy.configure_exchange(replace(spec, method=identify(strategy, spec.staleness, spec.aggregator)))
        self._timeline_path = None
        self.timeline_path(trainer)  # on every rank: log_dir is a collective

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        strategy = self._strategy(trainer)
        self._round_started_at = time.perf_counter()
        self._client_loss, self._client_steps = {}, {}
        self._shown_client = None
        round_state = strategy.start_round(trainer.current_epoch)
        self._round = round_state
        stale_round = round_state.index - self.staleness
        if self.staleness > 0 and stale_round in strategy.rounds_awaiting_exchange():
            strategy.start_exchange(stale_round)

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        self._strategy(trainer).start_turn_at(batch_idx)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Runs every step: keep it to appends and comparisons, anything more belongs to a turn or a round.
        strategy = self._strategy(trainer)
        client = strategy.active_client
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if client is not None and loss is not None:
            # Kept on the device until the round ends, so the loss costs no synchronization per step.
            losses = self._client_loss.setdefault(client, [])
            losses.append(loss.detach())
            if len(losses) % trainer.accumulate_grad_batches == 0:  # the step Lightning logs this batch's metrics at
                self._client_steps.setdefault(client, []).append(trainer.global_step - 1)
        if client != self._shown_client:
            self._shown_client = client
            self._show_turn(trainer, self._round.index, client, self._round.block)
        if strategy.is_last_batch_of_round(batch_idx):
            # The boundary comes before anything else of the epoch's end sees the model: validation
            # and checkpoints get the global model of this round, never a half-finished state.
            self._apply_boundary(trainer, pl_module)

    @staticmethod
    def _show_turn(trainer: "pl.Trainer", round_index: int, client: Optional[int], block: int) -> None:
        """Round, client and block in the progress bar, once per turn.

        Set as strings in the metrics the progress bar reads, not through ``self.log``: a logged value
        becomes a float tensor (shown as ``3.000`` by the rich bar), and logging costs on every step.
        Lightning (2.6) hands back its own dict here and only ever updates it, so the entries stay
        until the next turn replaces them.
        """
        turn = {"round": round_index, "client": client, "block": block}
        progress_bar_metrics(trainer).update({key: str(value) for key, value in turn.items() if value is not None})

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        strategy = self._strategy(trainer)
        if strategy.round_open:  # training stopped inside the round (max_steps)
            self._apply_boundary(trainer, pl_module)
        strategy.at_round_end()

    def _apply_boundary(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The round boundary: the last turn ends, the exchange due now is finished and applied."""
        strategy = self._strategy(trainer)
        round_state = strategy.end_last_turn()
        accumulate = trainer.accumulate_grad_batches
        record = RoundRecord(
            round=round_state.index,
            block=round_state.block,
            participants=list(round_state.participants),
            compute_seconds=dict(round_state.compute_seconds),
            # Lightning hands back the loss divided by the accumulation factor; undo it.
            client_loss={
                c: float(torch.stack(losses).sum()) * accumulate / len(losses)
                for c, losses in self._client_loss.items()
            },
            client_step_loss={
                c: _step_losses(self._client_loss[c], steps, accumulate) for c, steps in self._client_steps.items()
            },
            probe_seconds=round_state.probe_seconds,
            sync_download_bytes=dict(round_state.sync_download_bytes),
        )
        exchanged = round_state.index - self.staleness
        if self.staleness == 0:
            strategy.start_exchange(exchanged)
        outcome = strategy.finish_exchange(exchanged)
        if outcome is not None:
            _record_exchange(record, outcome)
        strategy.close_round()
        record.wall_seconds = time.perf_counter() - self._round_started_at
        record = strategy.merge_round_record(record)
        self.records.append(record)
        self._log(pl_module, record)
        print_round_line(trainer, record)
        self._save_timeline(trainer)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Algorithm 2, lines 12-14: exchange the rounds still pending, then the model is the global one."""
        strategy = self._strategy(trainer)
        flushed = strategy.rounds_awaiting_exchange()
        if flushed:
            strategy.begin_flush()
        for pending_round in flushed:
            started = time.perf_counter()
            strategy.start_exchange(pending_round)
            outcome = strategy.finish_exchange(pending_round)
            record = RoundRecord(pending_round, outcome.result.block, [], {}, flush=True)
            _record_exchange(record, outcome)
            record.wall_seconds = time.perf_counter() - started
            self.records.append(record)
        self._save_timeline(trainer)
        if flushed:
            save_final_checkpoints(trainer, flushed)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        # Before ModelCheckpoint(save_on_exception=True), which runs after every other callback.
        self._strategy(trainer).end_turn(record=False)

    def _log(self, pl_module: "pl.LightningModule", record: RoundRecord) -> None:
        """Per-round summaries through the Trainer's loggers (their ``epoch`` column is the round)."""
        metrics = {
            "parablock/block": float(record.block),
            "parablock/compute_s": record.process_compute_seconds,
            "parablock/exposed_wait_s": record.exposed_wait_seconds,
            "parablock/link_s": record.link_seconds,
            "parablock/bytes_moved": float(record.bytes_moved),
            "parablock/round_s": record.wall_seconds,
        }
        if record.client_loss:
            metrics["parablock/train_loss"] = record.mean_client_loss
        # Every rank holds the same merged record: a max over ranks changes no value, and it is the
        # epoch-level sync Lightning asks for with several processes (it warns about every metric otherwise).
        distributed = pl_module.trainer.world_size > 1
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=distributed, reduce_fx="max")
        _log_step_losses(pl_module.trainer, record)

    def summary(self) -> RunSummary:
        """Totals over the run so far: seconds measured on this process, bytes counted."""
        return RunSummary.of(self.records)

    def timeline_path(self, trainer: "pl.Trainer") -> Path:
        """``parablock_timeline.json`` beside the run's logs, or in a run folder of its own without a logger.

        Chosen once per fit, at setup: without a logger a new ``version_N`` folder is taken, and the timeline
        of this fit stays in it.
        """
        if self._timeline_path is None:
            self._timeline_path = run_folder(trainer) / TIMELINE_FILENAME
        return self._timeline_path

    def _save_timeline(self, trainer: "pl.Trainer") -> None:
        if not trainer.is_global_zero or self._timeline_path is None:
            return
        strategy = self._strategy(trainer)
        meta = {
            "method": identify(strategy, self.staleness, self.aggregator),
            "staleness": self.staleness,
            "link": {"bandwidth": self.link.bandwidth, "latency": self.link.latency},
            "compression": repr(self.codec),
            "num_clients": strategy.options.num_clients,
            "num_blocks": strategy.num_blocks,
            "world_size": trainer.world_size,
        }
        save_timeline(self._timeline_path, self.records, meta)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"records": [asdict(r) for r in self.records]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = [record_from_json(r) for r in state_dict["records"]]


def _step_losses(losses: list[Tensor], steps: list[int], accumulate: int) -> dict[int, float]:
    """A client's loss at each of its optimizer steps (the mean over the step's micro-batches), by Trainer step:
    one transfer from the device per client and round."""
    whole = len(steps) * accumulate  # a turn cut short by max_steps may end inside an accumulation
    per_step = torch.stack(losses[:whole]).view(len(steps), accumulate).sum(dim=1) if steps else torch.empty(0)
    return dict(zip(steps, per_step.tolist()))


def _log_step_losses(trainer: "pl.Trainer", record: RoundRecord) -> None:
    """Every client's loss at every optimizer step, one row per Trainer step, written to the loggers when the round
    ends (whatever ``log_every_n_steps`` says): ``parablock/train_loss/client_<c>`` at the step it was taken, with the
    round in ``epoch`` as Lightning writes it. Straight to the loggers: ``self.log`` would cost a result-collection
    update per value."""
    if not trainer.is_global_zero or not trainer.loggers:
        return
    rows: dict[int, dict[str, float]] = {}
    for client, losses in record.client_step_loss.items():
        for step, loss in losses.items():
            rows.setdefault(step, {"epoch": float(record.round)})[f"parablock/train_loss/client_{client}"] = loss
    for step in sorted(rows):
        for logger in trainer.loggers:
            logger.log_metrics(rows[step], step=step)


def _record_exchange(record: RoundRecord, outcome: ExchangeOutcome) -> None:
    """What a finished exchange adds to the record of the round it finished in."""
    result = outcome.result
    record.exposed_wait_seconds = outcome.exposed_wait_seconds
    record.exchanged_round = result.round
    record.skipped_clients = result.skipped_clients
    if result.skipped_clients:
        rank_zero_warn(
            f"Round {result.round}: left clients {result.skipped_clients} out of the aggregate for a non-finite"
            " delta; they resume from the global model."
        )
    record.upload_bytes, record.download_bytes = result.upload_bytes, result.download_bytes
    record.link_seconds, record.comm_work_seconds = result.link_seconds, result.work_seconds


def _check_listed_before(anchor: Callback, kind: type[Callback], callbacks: list[Callback]) -> None:
    """Refuse callbacks of ``kind`` listed before ``anchor``: Lightning runs callbacks in the order given.

    A client's turn starts in ``anchor``'s ``on_train_batch_start``; a ``LearningRateMonitor`` running before it
    would read the previous client's optimizer at every turn's first step.
    """
    early = [c for c in callbacks[: callbacks.index(anchor)] if isinstance(c, kind)]
    if early:
        raise MisconfigurationException(
            f"{kind.__name__} is listed before ParaBlockCallback in the Trainer's callbacks; it would read the previous"
            f" client's optimizer at each turn's first step. List it after ParaBlockCallback (e.g."
            f" `callbacks=[ParaBlockCallback(...), {kind.__name__}(...)]`)."
        )
