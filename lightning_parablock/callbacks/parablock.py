"""``ParaBlockCallback``: the exchange of block deltas and the round boundary.

At the start of round ``t`` the callback hands the deltas of round ``t − s`` to
the communication thread; the clients train round ``t`` meanwhile. At the end of
round ``t`` it waits for what is left of that exchange (the *exposed* wait),
applies it through the strategy, and records what the round cost. After the
last round it flushes the ``s`` rounds still pending, synchronously.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_parablock._compat import progress_bar_metrics
from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.argument_checks import check_int, check_positive
from lightning_parablock.callbacks.round_line import print_round_line
from lightning_parablock.comm.codecs import Codec, make_codec
from lightning_parablock.comm.exchange import RoundExchange
from lightning_parablock.comm.link import SimulatedLink, parse_duration
from lightning_parablock.comm.worker import CommWorker
from lightning_parablock.methods.registry import Method, identify
from lightning_parablock.methods.registry import method as method_settings
from lightning_parablock.strategies.federated_block import FederatedBlockStrategy
from lightning_parablock.strategies.trainer_checks import check_staleness, check_trainer
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
        aggregator: how the server combines deltas; by default the weighted mean of the paper, raising
            on a non-finite delta. See :class:`~lightning_parablock.aggregation.aggregator.Aggregator` for the robust
            rules and for skipping non-finite clients.
        comm_timeout: longest wait at a boundary for one exchange before it counts as failed, in
            seconds or as a string such as ``"600s"``.
        compression: how clients' deltas go up the link: ``"none"`` (fp32), ``"bf16"``, ``"int8"`` (a scale
            per row), ``"int8-block"`` (a scale per 256 values), ``"topk"`` (10% of the entries, with error
            feedback), or a :class:`~lightning_parablock.comm.codecs.Codec`. The server decodes to fp32 before
            aggregating; the bytes counted are the encoded ones. Works with either transport.
    """

    def __init__(
        self,
        staleness: Optional[int] = None,
        link: Optional[SimulatedLink] = None,
        aggregator: Optional[Aggregator] = None,
        comm_timeout: float | str = 1800.0,
        compression: Union[str, Codec, None] = "none",
    ) -> None:
        self.staleness = check_int("staleness (0 = FedBCD, 1 = ParaBlock)", 1 if staleness is None else staleness, minimum=0)
        if link is not None and not isinstance(link, SimulatedLink):
            raise TypeError(f"`link` must be a SimulatedLink, e.g. `SimulatedLink(bandwidth='100MB/s')`, got {link!r}.")
        if aggregator is not None and not isinstance(aggregator, Aggregator):
            raise TypeError(
                f"`aggregator` must be an Aggregator (or a subclass), e.g. `Aggregator(method='median')`,"
                f" got {aggregator!r}."
            )
        self.link = link if link is not None else SimulatedLink()
        self.aggregator = aggregator if aggregator is not None else Aggregator()
        self.comm_timeout = check_positive("comm_timeout", parse_duration(comm_timeout, "comm_timeout"))
        self.codec = make_codec(compression)
        self.records: list[RoundRecord] = []
        self._worker: Optional[CommWorker] = None
        self._timeline_path: Optional[Path] = None
        self._round_started_at = 0.0
        self._client_loss: dict[int, list[Tensor]] = {}  # client -> its micro-batches' losses this round
        self._shown_client: Optional[int] = None  # the client the progress bar names

    @classmethod
    def for_method(cls, method: Union[str, Method], **kwargs: Any) -> "ParaBlockCallback":
        """The callback of one of the paper's Table 1 methods (``"fedit"``, ...): its staleness and aggregator.

        ``kwargs`` are the other arguments (``link``, ``comm_timeout``, ``compression``).
        """
        spec = method if isinstance(method, Method) else method_settings(method)
        return cls(**spec.callback_args(), **kwargs)

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
        check_staleness(trainer, self.staleness)
        strategy.check_exchange(self.staleness, self.aggregator)
        strategy.exchange_settings = {  # saved in checkpoints, compared when Lightning loads one (after this hook)
            "method": identify(strategy, self.staleness, self.aggregator),
            "staleness": self.staleness,
            "compression": repr(self.codec),
            "aggregator": repr(self.aggregator),
        }
        _move_after(self, LearningRateMonitor, trainer.callbacks)
        self._timeline_path = None
        self.timeline_path(trainer)  # on every rank: log_dir is a collective

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # After the strategy's setup: the exchange it answers for exists now.
        self._worker = self._strategy(trainer).exchange.comm_worker(self.link, self.aggregator, self.comm_timeout)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        strategy = self._strategy(trainer)
        self._round_started_at = time.perf_counter()
        self._client_loss = {}
        self._shown_client = None
        round_state = strategy.start_round(trainer.current_epoch)
        stale_round = round_state.index - self.staleness
        if self.staleness > 0 and stale_round in strategy.federation.pending_rounds():
            self._submit(strategy, stale_round)

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        self._strategy(trainer).start_turn_at(batch_idx)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Runs every step: keep it to appends and comparisons, anything more belongs to a turn or a round.
        strategy = self._strategy(trainer)
        client = strategy.federation.active_client
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if client is not None and loss is not None:
            # Kept on the device until the round ends, so the loss costs no synchronization per step.
            self._client_loss.setdefault(client, []).append(loss.detach())
        if client != self._shown_client:
            self._shown_client = client
            self._show_turn(trainer, strategy)
        if strategy.is_last_batch_of_round(batch_idx):
            # The boundary comes before anything else of the epoch's end sees the model: validation
            # and checkpoints get the global model of this round, never a half-finished state.
            self._apply_boundary(trainer, pl_module)

    @staticmethod
    def _show_turn(trainer: "pl.Trainer", strategy: FederatedBlockStrategy) -> None:
        """Round, client and block in the progress bar, once per turn.

        Set as strings in the metrics the progress bar reads, not through ``self.log``: a logged value
        becomes a float tensor (shown as ``3.000`` by the rich bar), and logging costs on every step.
        Lightning (2.6) hands back its own dict here and only ever updates it, so the entries stay
        until the next turn replaces them.
        """
        current = strategy.turns.current
        turn = {"round": current.index, "client": strategy.federation.active_client, "block": current.block}
        progress_bar_metrics(trainer).update({key: str(value) for key, value in turn.items() if value is not None})

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        strategy = self._strategy(trainer)
        if strategy.round_open:  # training stopped inside the round (max_steps)
            self._apply_boundary(trainer, pl_module)
        strategy.boundary_applied()

    def _apply_boundary(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The round boundary: the last turn ends, the exchange due now is collected and applied."""
        strategy = self._strategy(trainer)
        round_state = strategy.end_round_training()
        record = RoundRecord(
            round=round_state.index,
            block=round_state.block,
            participants=list(round_state.participants),
            compute_seconds=dict(round_state.compute_seconds),
            # Lightning hands back the loss divided by the accumulation factor; undo it.
            client_loss={
                c: float(torch.stack(losses).sum()) * trainer.accumulate_grad_batches / len(losses)
                for c, losses in self._client_loss.items()
            },
            probe_seconds=round_state.probe_seconds,
            sync_download_bytes=dict(round_state.sync_download_bytes),
        )
        exchanged = round_state.index - self.staleness
        if self.staleness == 0:
            self._submit(strategy, exchanged)
        if self._worker is not None and self._worker.in_flight(exchanged):
            self._collect(strategy, exchanged, record)
        round_state.closed = True
        record.wall_seconds = time.perf_counter() - self._round_started_at
        record = strategy.exchange.merge_round_record(record)
        self.records.append(record)
        self._log(pl_module, record)
        print_round_line(trainer, record)
        self._save_timeline(trainer)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Algorithm 2, lines 12-14: exchange the rounds still pending, then the model is the global one."""
        strategy = self._strategy(trainer)
        flushed = strategy.federation.pending_rounds()
        for pending_round in flushed:
            started = time.perf_counter()
            record = RoundRecord(pending_round, strategy.plan.block_of(pending_round), [], {}, flush=True)
            self._submit(strategy, pending_round)
            self._collect(strategy, pending_round, record)
            record.wall_seconds = time.perf_counter() - started
            self.records.append(record)
        self._save_timeline(trainer)
        if flushed:
            _save_final_checkpoints(trainer, flushed)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        # Before ModelCheckpoint(save_on_exception=True), which runs after every other callback.
        self._strategy(trainer).abandon_turn()
        self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    def _submit(self, strategy: FederatedBlockStrategy, round_index: int) -> None:
        assert self._worker is not None, "ParaBlockCallback is not set up"
        self._worker.submit(
            round_index,
            strategy.plan.block_of(round_index),
            strategy.exchange.uploads(round_index, self.codec),
            strategy.exchange.weights(round_index),
        )

    def _collect(self, strategy: FederatedBlockStrategy, round_index: int, record: RoundRecord) -> None:
        assert self._worker is not None
        waited_from = time.perf_counter()
        result: RoundExchange = self._worker.wait(round_index)
        record.exposed_wait_seconds = time.perf_counter() - waited_from
        strategy.exchange.apply_aggregate(result.round, result.aggregate, left_out=result.skipped_clients)
        record.exchanged_round = result.round
        record.skipped_clients = result.skipped_clients
        if result.skipped_clients:
            rank_zero_warn(
                f"Round {result.round}: left clients {result.skipped_clients} out of the aggregate for a non-finite"
                " delta; they resume from the global model."
            )
        record.upload_bytes, record.download_bytes = result.upload_bytes, result.download_bytes
        record.link_seconds, record.comm_work_seconds = result.link_seconds, result.work_seconds

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
            "num_blocks": len(strategy.partition) if strategy.partition is not None else None,
            "world_size": trainer.world_size,
        }
        save_timeline(self._timeline_path, self.records, meta)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"records": [asdict(r) for r in self.records]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = [record_from_json(r) for r in state_dict["records"]]


def _move_after(anchor: Callback, kind: type[Callback], callbacks: list[Callback]) -> None:
    """Move callbacks of ``kind`` listed before ``anchor`` to just after it, keeping their order.

    A client's turn starts in ``anchor``'s ``on_train_batch_start``; a ``LearningRateMonitor`` running
    before it would read the previous client's optimizer at every turn's first step.
    """
    early = [c for c in callbacks[: callbacks.index(anchor)] if isinstance(c, kind)]
    for callback in early:
        callbacks.remove(callback)
    position = callbacks.index(anchor) + 1
    callbacks[position:position] = early


def _save_final_checkpoints(trainer: "pl.Trainer", flushed: list[int]) -> None:
    """Make the run's last checkpoint hold the final global model, not the one before the flush.

    ``last.ckpt`` is rewritten (a ``save_last="link"`` link is replaced by a file, so the per-round
    checkpoint it pointed at stays the resumable state of its round); a ModelCheckpoint without
    ``save_last`` gets ``final.ckpt`` beside its per-round files.
    """
    for checkpoint in trainer.checkpoint_callbacks:
        if not isinstance(checkpoint, ModelCheckpoint) or checkpoint.dirpath is None:
            continue
        if not (checkpoint.last_model_path or checkpoint.best_model_path):
            continue  # it never saved: nothing of this run to bring up to date
        path = checkpoint.last_model_path if checkpoint.save_last else os.path.join(checkpoint.dirpath, "final.ckpt")
        if trainer.is_global_zero and os.path.islink(path):
            os.unlink(path)
        trainer.save_checkpoint(path)
        if checkpoint.save_last:
            checkpoint.last_model_path = path
        rank_zero_info(f"ParaBlock: flushed rounds {flushed}; {path} now holds the final global model.")
