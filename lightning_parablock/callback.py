"""``ParaBlockCallback``: the exchange of block deltas and the round boundary.

At the start of round ``t`` the callback hands the deltas of round ``t − s`` to
the communication thread; the clients train round ``t`` meanwhile. At the end of
round ``t`` it waits for what is left of that exchange (the *exposed* wait),
applies it through the strategy, and records what the round cost. After the
last round it flushes the ``s`` rounds still pending, synchronously.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_parablock.comm import CommWorker, RoundExchange, SimulatedLink, parse_duration
from lightning_parablock.strategy import FederatedBlockStrategy

if TYPE_CHECKING:
    import lightning.pytorch as pl


@dataclass
class RoundRecord:
    """What one round did and cost, measured on this process."""

    round: int
    block: int
    participants: list[int]
    compute_seconds: dict[int, float]
    exchanged_round: Optional[int] = None  # the round whose deltas crossed the link during this one
    bytes_up: int = 0
    bytes_down: int = 0
    link_seconds: float = 0.0  # modelled
    comm_work_seconds: float = 0.0  # measured on the comm thread
    exposed_wait_seconds: float = 0.0  # measured: main thread blocked at the boundary
    wall_seconds: float = 0.0  # measured: the whole round on this process
    flush: bool = False


@dataclass
class RunSummary:
    rounds: int
    bytes_moved: int
    measured_seconds: float
    exposed_wait_seconds: float
    compute_seconds: float
    records: list[RoundRecord] = field(default_factory=list)

    def format(self) -> str:
        return (
            f"rounds: {self.rounds}  bytes moved: {self.bytes_moved / 1e6:.2f} MB"
            f"  measured time: {self.measured_seconds:.1f}s (compute {self.compute_seconds:.1f}s,"
            f" exposed comm wait {self.exposed_wait_seconds:.2f}s)"
        )


class ParaBlockCallback(Callback):
    """Runs ParaBlock's communication in the background and applies the round boundary.

    Args:
        staleness: rounds between training a block and aggregating it. ``0`` is FedBCD (train,
            then exchange, synchronously), ``1`` is ParaBlock (exchange round ``t − 1`` while
            training round ``t``), ``k ≥ 2`` the paper's multi-round staleness.
        link: the modelled link; by default an infinitely fast one (only real work is timed).
        comm_timeout: longest wait at a boundary for one exchange before it counts as failed, in
            seconds or as a string such as ``"600s"``.
    """

    def __init__(
        self,
        staleness: int = 1,
        link: Optional[SimulatedLink] = None,
        comm_timeout: float | str = 1800.0,
    ) -> None:
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise ValueError(
                f"`staleness` must be a non-negative integer (0 = FedBCD, 1 = ParaBlock), got {staleness!r}."
            )
        self.staleness = staleness
        self.link = link if link is not None else SimulatedLink()
        self.comm_timeout = parse_duration(comm_timeout)
        if self.comm_timeout <= 0:
            raise ValueError(f"`comm_timeout` must be positive, got {comm_timeout!r}.")
        self.records: list[RoundRecord] = []
        self._worker: Optional[CommWorker] = None
        self._round_started_at = 0.0

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
        self._strategy(trainer)
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs > 0 and self.staleness >= max_epochs:
            raise MisconfigurationException(
                f"`staleness={self.staleness}` is not below the number of rounds (max_epochs={max_epochs}):"
                f" no exchange would overlap training. Use a staleness from 0 to {max_epochs - 1}."
            )
        self._worker = CommWorker(self.link, self.comm_timeout)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        strategy = self._strategy(trainer)
        self._round_started_at = time.perf_counter()
        round_state = strategy.begin_round(trainer.current_epoch)
        stale_round = round_state.index - self.staleness
        if self.staleness > 0 and stale_round in strategy.pending_rounds():
            self._submit(strategy, stale_round)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        strategy = self._strategy(trainer)
        round_state = strategy.finish_round()
        record = RoundRecord(
            round=round_state.index,
            block=round_state.block,
            participants=list(round_state.participants),
            compute_seconds=dict(round_state.compute_seconds),
        )
        exchanged = round_state.index - self.staleness
        if self.staleness == 0:
            self._submit(strategy, exchanged)
        if self._worker is not None and self._worker.in_flight(exchanged):
            self._collect(strategy, exchanged, record)
        record.wall_seconds = time.perf_counter() - self._round_started_at
        self.records.append(record)
        self._log(pl_module, record)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Algorithm 2, lines 12-14: exchange the rounds still pending, then the model is the global one."""
        strategy = self._strategy(trainer)
        if strategy.current is not None and not strategy.current.finished:
            strategy.finish_round()  # training stopped inside a round (max_steps)
        for pending_round in strategy.pending_rounds():
            started = time.perf_counter()
            record = RoundRecord(pending_round, strategy.block_of(pending_round), [], {}, flush=True)
            self._submit(strategy, pending_round)
            self._collect(strategy, pending_round, record)
            record.wall_seconds = time.perf_counter() - started
            self.records.append(record)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    def _submit(self, strategy: FederatedBlockStrategy, round_index: int) -> None:
        assert self._worker is not None, "ParaBlockCallback is not set up"
        self._worker.submit(
            round_index,
            strategy.block_of(round_index),
            strategy.round_deltas(round_index),
            strategy.round_weights(round_index),
        )

    def _collect(self, strategy: FederatedBlockStrategy, round_index: int, record: RoundRecord) -> None:
        assert self._worker is not None
        waited_from = time.perf_counter()
        result: RoundExchange = self._worker.wait(round_index)
        record.exposed_wait_seconds = time.perf_counter() - waited_from
        strategy.apply_aggregate(result.round, result.block, result.aggregate)
        record.exchanged_round = result.round
        record.bytes_up, record.bytes_down = result.bytes_up, result.bytes_down
        record.link_seconds, record.comm_work_seconds = result.link_seconds, result.work_seconds

    def _log(self, pl_module: "pl.LightningModule", record: RoundRecord) -> None:
        metrics = {
            "parablock/round": float(record.round),
            "parablock/block": float(record.block),
            "parablock/compute_s": sum(record.compute_seconds.values()),
            "parablock/exposed_wait_s": record.exposed_wait_seconds,
            "parablock/link_s": record.link_seconds,
            "parablock/bytes_moved": float(record.bytes_up + record.bytes_down),
        }
        pl_module.log_dict(metrics, on_step=False, on_epoch=True)

    def summary(self) -> RunSummary:
        """Totals over the run so far, all measured on this process except bytes (counted)."""
        return RunSummary(
            rounds=sum(not r.flush for r in self.records),
            bytes_moved=sum(r.bytes_up + r.bytes_down for r in self.records),
            measured_seconds=sum(r.wall_seconds for r in self.records),
            exposed_wait_seconds=sum(r.exposed_wait_seconds for r in self.records),
            compute_seconds=sum(sum(r.compute_seconds.values()) for r in self.records),
            records=list(self.records),
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"records": [asdict(r) for r in self.records]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = [RoundRecord(**r) for r in state_dict["records"]]
