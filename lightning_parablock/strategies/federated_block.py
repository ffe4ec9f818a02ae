"""``FederatedBlockStrategy``: the Lightning hooks of a federated fit, over parts that own its state.

The LightningModule's parameters *are* the global model. Each process hosts a fixed, seeded share of the
clients (all of them with one device). The parts: the checked, frozen
:class:`~.federation_options.FederationOptions` (``strategy.options``), a
:class:`~lightning_parablock.core.planning.RoundPlan` (who trains which block in which turn), the
:class:`~lightning_parablock.core.federation.Federation` (every hosted client's pending deltas over the one
global model), :class:`~.client_exchange.ClientExchange` (``strategy.client_exchange``: what the hosted clients send,
the boundary that applies the aggregate, the transport), :class:`~.turns.Turns` (``strategy.turns``: the round
in progress, whose view is loaded, timed), :class:`~.client_optimizers.ClientOptimizers`,
:class:`~.federation_checkpoint.FederationCheckpoint` and
:class:`~lightning_parablock.fault_tolerance.fault_handling.FaultHandling`. No gradients are all-reduced: clients
train independently.

Rounds are epochs. The exchange is set once per fit by :meth:`FederatedBlockStrategy.configure_exchange` (an
:class:`~.exchange_spec.ExchangeSpec`; ``ParaBlockCallback`` hands its own over at setup), and the callback drives
rounds through a small protocol: :meth:`~FederatedBlockStrategy.start_round`,
:meth:`~FederatedBlockStrategy.start_turn_at` before each batch, :meth:`~FederatedBlockStrategy.end_last_turn` after
the round's last batch, :meth:`~FederatedBlockStrategy.start_exchange` / :meth:`~FederatedBlockStrategy.finish_exchange` for a
round's deltas, :meth:`~FederatedBlockStrategy.close_round` once the boundary is applied and
:meth:`~FederatedBlockStrategy.at_round_end` when the epoch ends. A method of its own extends the strategy through
named hooks: :meth:`~FederatedBlockStrategy.make_round_plan`, :meth:`~FederatedBlockStrategy.make_client_exchange`,
:meth:`~FederatedBlockStrategy.on_client_turn_end`, :meth:`~FederatedBlockStrategy.check_options`,
:meth:`~FederatedBlockStrategy.check_exchange` and :meth:`~FederatedBlockStrategy.round_sync_downloads`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Optional, Union, get_args

import torch
from lightning.fabric.plugins import ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage, TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_parablock._compat import (
    Device,
    PathLike,
    StrategyRegistryType,
    optimizers_to_device,
    sync_module_states,
)
from lightning_parablock.aggregation.aggregator import Weighting
from lightning_parablock.argument_checks import check_choice, check_float
from lightning_parablock.core.blocks import BlockPartition, LayerSplit, RemainderPolicy
from lightning_parablock.core.federation import Federation, OptimizerStatePolicy
from lightning_parablock.core.fp32_buffers import fp32_rotary_buffers
from lightning_parablock.core.lr_schedule import LearningRateSchedule, LrScheduleKind
from lightning_parablock.core.planning import RoundPlan, place_clients
from lightning_parablock.core.run_length import rounds_for_passes, rounds_in_run
from lightning_parablock.core.sampler import FederatedBatchSampler
from lightning_parablock.core.schedule import BlockSchedule, ScheduleKind
from lightning_parablock.fault_tolerance.fault_handling import FaultHandling
from lightning_parablock.strategies.checkpoint_file import read_checkpoint_file
from lightning_parablock.strategies.client_data import (
    check_train_loader,
    client_batch_sampler,
    federated_loader,
    make_clients,
)
from lightning_parablock.strategies.client_exchange import ClientExchange, ExchangeOutcome
from lightning_parablock.strategies.client_optimizers import ClientOptimizers
from lightning_parablock.strategies.exchange_spec import ExchangeSpec, with_strategy_weighting
from lightning_parablock.strategies.federation_checkpoint import CHECKPOINT_KEY, FederationCheckpoint, may_save
from lightning_parablock.strategies.federation_options import FederationOptions, check_process_options
from lightning_parablock.strategies.gradient_probe import GradientProbe
from lightning_parablock.strategies.precision_policy import check_precision
from lightning_parablock.strategies.run_outline import RunOutline
from lightning_parablock.strategies.run_settings import RunSettings
from lightning_parablock.strategies.trainer_checks import check_module_and_precision, check_turn_plan
from lightning_parablock.strategies.turns import RoundState, Turns
from lightning_parablock.telemetry.timeline import RoundRecord

if TYPE_CHECKING:
    import lightning.pytorch as pl

StartMethod = Literal["popen", "spawn", "fork", "forkserver"]


class FederatedBlockStrategy(DDPStrategy):
    """Federated block-coordinate fine-tuning: N clients, one global model per process.

    Each epoch is one round: the round's block is unfrozen, every participant trains it for
    ``local_steps`` optimizer steps (times ``accumulate_grad_batches`` micro-batches) from its
    own view of the model, and its change to the block is kept as a pending delta until the
    callback aggregates it. Memory per process is one model plus, per hosted client, at most
    ``staleness + 1`` block deltas (and optimizer state when it is kept per block).

    With ``Trainer(devices=N, num_nodes=M)`` (or ``torchrun``/SLURM) every process hosts a fixed,
    seeded share of the clients and trains its participants while the others train theirs; a
    rank whose clients sit out a round contributes no weight and waits through idle steps, so that
    every rank runs the same number of batches.

    Args:
        num_clients: clients in the federation.
        local_steps: optimizer steps each participant takes per round (K).
        layers_per_block: consecutive decoder layers per block.
        layer_split: ``"attention_mlp"`` makes attention and MLP of each layer separate blocks.
        remainder: what to do when ``layers_per_block`` does not divide the layer count.
        include_embeddings: make the input embeddings a block (frozen otherwise).
        include_head: make the final norm and LM head a block (frozen otherwise).
        block_patterns: regular expressions over parameter names, one entry per block, for
            models without a decoder stack; replaces the decoder detection.
        schedule: which block a round trains: ``"random"`` (the paper), ``"sequential"``, ``"reverse"``,
            ``"permutation"`` (every block once per cycle), ``"gradient"`` (the largest gradient norm on
            the round's first batch, one extra backward per round) or ``"spaced"`` (random, but never a block
            trained in the last ``schedule_spacing`` rounds while there are more blocks than that).
        schedule_spacing: with ``schedule="spaced"``, how many past rounds' blocks a round avoids; by default
            the callback's staleness (at least 1), so no client trains a block whose own delta is still pending.
        client_optimizer: builds a client's optimizer from the block's parameters. Defaults to the
            LightningModule's ``configure_optimizers``, called whenever a client needs a new optimizer
            (every turn with ``optimizer_state="reset"``, once per client and block with ``"per_block"``).
        optimizer_state: ``"reset"`` starts every client's optimizer afresh at each block switch (the
            paper); ``"per_block"`` keeps each client's state for each block it has trained, which grows
            towards optimizer state for the whole model per client once every block has been trained.
        lr_schedule: the clients' learning rate over the run: ``"constant"`` (the paper), or a ``"linear"`` or
            ``"cosine"`` decay to ``min_lr_ratio`` × the optimizer's rate at the run's end. It follows the
            federation's progress: step ``k`` of a turn in round ``t`` is at position ``t × local_steps + k`` of a
            run ``rounds × local_steps`` long (rounds from the Trainer's ``max_epochs`` or ``max_steps``), so every
            client trains at the same rate at the same point of its turn. Each param group's own rate is scaled.
        warmup_steps: linear warmup over the first positions (local steps, as above), from ``1/warmup_steps`` of
            the rate to all of it.
        warmup_ratio: the warmup as a fraction of the run's positions instead (rounded up).
        min_lr_ratio: where a decaying schedule ends, as a fraction of the rate.
        global_lr: η, the step the server and the clients take along aggregated deltas (every client applies it to
            its own pending deltas too: it is the federation's, not only the server's).
        participation: fraction of clients that train each round, in (0, 1].
        clients_per_round: number of clients per round; overrides ``participation``.
        weighting: deprecated (0.2): the weights belong to the aggregator, e.g. ``MeanAggregator(weighting="samples")``.
            Given here, it is applied to the run's aggregator (a different weighting there is refused).
        seed: seeds the block schedule, the participants, each client's data order and the placement
            of clients on ranks.
        shuffle: each client reads its shard in a seeded random order, reshuffled every pass; with
            ``False`` in the order the datamodule gave.
        master_weights: with ``precision="bf16-true"`` or ``"16-true"``, train the active block through fp32
            master copies made when a client's turn starts and dropped when it ends (the optimizer state is
            fp32 too, for that block only); without them an optimizer step below half precision's resolution
            rounds away. Deltas and the aggregate are fp32 either way.
        offload_deltas: keep pending deltas in host memory instead of on the device. For large models on
            a GPU: N clients × (staleness + 1) fp32 blocks leave GPU memory, and each turn copies its
            client's deltas back (a 2-layer block of Llama 3-8B is 1.75 GB in fp32).
        device: the device of the global model with one process; by default the Trainer's ``devices``. ``"cuda"``
            without an index means ``"cuda:0"``.
        process_group_backend: for several processes, ``"gloo"`` or ``"nccl"``; by default by device.
        timeout: the default process group's timeout (several processes).
        start_method: how Lightning starts the other local processes (``"popen"`` reruns the script).
    """

    strategy_name = "federated_block"

    def __init__(
        self,
        num_clients: int = 10,
        local_steps: int = 8,
        layers_per_block: int = 1,
        layer_split: LayerSplit = "none",
        remainder: RemainderPolicy = "error",
        include_embeddings: bool = False,
        include_head: bool = False,
        block_patterns: Optional[list[Union[str, list[str]]]] = None,
        schedule: ScheduleKind = "random",
        schedule_spacing: Optional[int] = None,
        client_optimizer: Optional[OptimizerCallable] = None,
        optimizer_state: OptimizerStatePolicy = "reset",
        lr_schedule: LrScheduleKind = "constant",
        warmup_steps: int = 0,
        warmup_ratio: Optional[float] = None,
        min_lr_ratio: float = 0.0,
        global_lr: float = 1.0,
        participation: float = 1.0,
        clients_per_round: Optional[int] = None,
        weighting: Optional[Weighting] = None,
        seed: int = 0,
        shuffle: bool = True,
        offload_deltas: bool = False,
        master_weights: bool = True,
        device: Optional[Device] = None,
        accelerator: Optional[Accelerator] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: StartMethod = "popen",
        cluster_environment: Optional[ClusterEnvironment] = None,
    ) -> None:
        self.options = FederationOptions(
            num_clients=num_clients, local_steps=local_steps, layers_per_block=layers_per_block,
            layer_split=layer_split, remainder=remainder, include_embeddings=include_embeddings,
            include_head=include_head, block_patterns=block_patterns, schedule=schedule,
            schedule_spacing=schedule_spacing, optimizer_state=optimizer_state, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio, global_lr=global_lr,
            participation=participation, clients_per_round=clients_per_round, weighting=weighting, seed=seed,
            shuffle=shuffle, offload_deltas=offload_deltas, master_weights=master_weights,
        )  # fmt: skip
        if weighting is not None:
            warnings.warn(
                f"`FederatedBlockStrategy(weighting={weighting!r})` is deprecated: the weights belong to the aggregator,"
                f" e.g. `ParaBlockCallback(aggregator=MeanAggregator(weighting={weighting!r}))`. It is applied to the"
                " run's aggregator until 0.3.",
                FutureWarning,
                stacklevel=2,
            )
        self.check_options(self.options)
        device = check_process_options(device, process_group_backend, timeout)
        check_choice("start_method", start_method, get_args(StartMethod))
        super().__init__(
            accelerator=accelerator,
            parallel_devices=None if device is None else [device],
            cluster_environment=cluster_environment,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.client_optimizers = ClientOptimizers(client_optimizer)
        self.checkpoint = FederationCheckpoint()
        self._exchange_spec: Optional[ExchangeSpec] = None  # set by configure_exchange, once per fit
        self._federation_set_up = False  # between the strategy's setup and teardown: the exchange is in use
        self._flushed = False  # the run's last rounds are exchanged: what is saved now is the final model
        self.faults = FaultHandling()

        self.placement: list[int] = [0] * self.options.num_clients  # the member hosting each client, once set up
        self.partition: Optional[BlockPartition] = None
        self.schedule: Optional[BlockSchedule] = None
        self.plan: Optional[RoundPlan] = None
        self.lr_schedule: Optional[LearningRateSchedule] = None  # resolved at setup, from the run's length
        self.federation: Optional[Federation] = None
        self.client_exchange: Optional[ClientExchange] = None
        self.turns: Optional[Turns] = None
        self.batch_sampler: Optional[FederatedBatchSampler] = None

    # ----------------------------------------------------------- processes

    @property
    @override
    def root_device(self) -> torch.device:
        if not self.parallel_devices:
            return torch.device("cpu")
        return self.parallel_devices[self.local_rank]

    @property
    def distributed(self) -> bool:
        """More than one process: clients are spread over ranks and meet in collectives."""
        return self.num_nodes * self.num_processes > 1

    @override
    def _configure_launcher(self) -> None:
        if self.distributed:
            super()._configure_launcher()
        else:
            self._launcher = None  # one process: nothing to launch, and notebooks keep working

    @override
    def setup_distributed(self) -> None:
        if self.distributed:
            super().setup_distributed()
        else:
            self.set_world_ranks()

    @override
    def connect(self, model: "pl.LightningModule") -> None:
        super().connect(model)
        self.client_optimizers.attach(model)

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        with fp32_rotary_buffers(self.model):  # bf16-true would round RoPE's inverse frequencies
            self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if self.distributed:
            sync_module_states(self.model)  # every rank starts from rank 0's global model
        if trainer.state.fn == TrainerFn.FITTING:
            self._setup_federation(trainer)
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    @override
    def configure_ddp(self) -> None:
        """Clients train independently: no DistributedDataParallel, no gradient all-reduce."""

    # ------------------------------------------------------------ the exchange

    def configure_exchange(self, spec: ExchangeSpec) -> None:
        """Take the run's exchange; ``ParaBlockCallback`` hands its own over at setup, before the strategy's setup.

        Checked here (:meth:`check_exchange`) and owned from then on: the strategy keeps its own copies of the
        aggregator, codec and link (a change to the caller's objects does not reach a run in progress), records the
        spec in the run's checkpoints and compares it with a resumed one once the strategy is set up. Refused while
        a fit is set up: its exchange is in use.
        """
        if not isinstance(spec, ExchangeSpec):
            raise TypeError(f"`configure_exchange` takes an ExchangeSpec, got {spec!r}.")
        if self._federation_set_up:
            raise MisconfigurationException(
                "`configure_exchange` was called while a fit is set up and its exchange in use; hand the strategy its"
                " ExchangeSpec before the fit's setup (ParaBlockCallback does, in its own `setup`)."
            )
        spec = replace(spec, aggregator=copy.deepcopy(spec.aggregator), codec=copy.deepcopy(spec.codec), link=copy.deepcopy(spec.link))
        spec = with_strategy_weighting(spec, self.options.weighting)
        self.check_exchange(spec)
        self._exchange_spec = spec

    @property
    def exchange_spec(self) -> Optional[ExchangeSpec]:
        """The run's exchange, as :meth:`configure_exchange` took it (``None`` before)."""
        return self._exchange_spec

    def check_exchange(self, spec: ExchangeSpec) -> None:
        """Hook: refuse an exchange this strategy cannot run (FLoRA and FedCyBGD are synchronous); any goes here."""

    def check_options(self, options: FederationOptions) -> None:
        """Hook: refuse options a method cannot honour (FedCyBGD plans its own participants and blocks)."""

    def run_settings(self) -> RunSettings:
        """What defines this run, saved in its checkpoints and compared on resume (see
        :mod:`~lightning_parablock.strategies.run_settings`): the strategy's options, the exchange's and the
        Trainer's precision."""
        spec = self.exchange_spec
        settings = {"strategy": type(self).__name__, **self.options.run_settings(None if spec is None else spec.staleness)}
        if self.lr_schedule is not None:
            settings.update(self.lr_schedule.run_settings())
        if spec is not None:
            settings.update(spec.run_settings())
        trainer = _attached_trainer(self.lightning_module)
        if trainer is not None:
            settings["precision"] = str(trainer.precision)
        return settings

    def _setup_federation(self, trainer: "pl.Trainer") -> None:
        model, options, spec = self.lightning_module, self.options, self._exchange_spec
        if spec is None:
            raise MisconfigurationException(
                "FederatedBlockStrategy has no exchange: add `ParaBlockCallback(...)` to the Trainer's callbacks; it"
                " hands the strategy its ExchangeSpec at setup and drives every round."
            )
        check_module_and_precision(trainer, model)
        check_precision(model, str(trainer.precision))
        member, members = spec.transport.membership(self.global_rank, self.world_size)
        self.placement = place_clients(options.num_clients, members, options.seed)
        self._flushed = False
        self.partition = options.partition(model)
        shortfall = options.spacing_shortfall(len(self.partition), spec.staleness)
        if shortfall is not None:
            rank_zero_warn(shortfall)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        probe = self._gradient_probe(trainable)
        self.schedule = BlockSchedule(options.schedule, len(self.partition), options.seed, probe, options.spacing(spec.staleness))
        self.plan = self.make_round_plan(self.schedule, member, members)
        self.lr_schedule = options.learning_rate_schedule(self.rounds_in_run(trainer), _limits(trainer))
        self.checkpoint.check(options.num_clients, self.world_size, self.placement, self.run_settings())
        self.checkpoint.check_blocks(self.partition)
        self.checkpoint.restore_schedule(self.schedule)  # before the plan asks for its first block
        self.federation = Federation(
            model,
            self.partition,
            global_lr=options.global_lr,
            optimizer_state=options.optimizer_state,
            offload_deltas=options.offload_deltas,
            new_optimizer=self.client_optimizers.new,
            master_weights=options.master_weights,
        )
        self.client_exchange = self.make_client_exchange(self.federation, self.plan, spec)
        self.client_exchange.open(member, members)
        self._federation_set_up = True
        self.turns = Turns(self.federation, self.root_device, self.plan, trainable)
        self.checkpoint.setup(self.distributed)
        self.faults.install(trainer, self.distributed, lambda: self.batch_sampler.batches_per_turn)

    def rounds_in_run(self, trainer: "pl.Trainer") -> Optional[int]:
        """Rounds this fit trains, from the Trainer's ``max_epochs`` and ``max_steps`` (``None``: no set end)."""
        steps_in_round = lambda t: self.plan.turns_per_round(t) * self.options.local_steps  # noqa: E731
        return rounds_in_run(trainer.max_epochs, trainer.max_steps, steps_in_round)

    @property
    def participants_per_round(self) -> int:
        """Clients that train in each round (FedCyBGD: one)."""
        return self.options.participants_per_round

    def samples_per_round(self, batch_size: int, accumulate_grad_batches: int = 1) -> int:
        """Training samples one round reads: participants × local steps × batch size × accumulation."""
        return self.participants_per_round * self.options.local_steps * batch_size * accumulate_grad_batches

    def rounds_for_passes(
        self, passes: float, num_samples: int, batch_size: int, accumulate_grad_batches: int = 1
    ) -> int:
        """``max_epochs`` for a run that reads its ``num_samples`` training samples ``passes`` times over (rounded
        up to whole rounds), e.g. ``Trainer(max_epochs=strategy.rounds_for_passes(2, len(dataset), 8))``."""
        check_float("passes", passes, minimum=0.0, min_open=True)
        return rounds_for_passes(passes, num_samples, self.samples_per_round(batch_size, accumulate_grad_batches))

    def make_round_plan(self, schedule: BlockSchedule, member: int, members: int) -> RoundPlan:
        """Hook: who trains which block in which round (FedCyBGD plans its cycle instead)."""
        options = self.options
        return RoundPlan(
            options.num_clients, options.participants_per_round, options.seed, schedule, self.placement, members, member
        )

    def make_client_exchange(self, federation: Federation, plan: RoundPlan, spec: ExchangeSpec) -> ClientExchange:
        """Hook: this process's side of the exchange (FLoRA sends rank-r_i adapters and merges stacked products)."""
        return ClientExchange(federation, plan, spec, self.options.global_lr, self.root_device)

    def _gradient_probe(self, trainable: set[str]) -> Optional[GradientProbe]:
        """The gradient schedule's probe: the first batch of the round's first participant (the same on every
        rank, so every rank picks the same block) through the global model's blocks."""
        if self.options.schedule != "gradient":
            return None

        def first_batch(round_index: int) -> Any:
            loader = self.lightning_module.trainer.train_dataloader
            indices = self.batch_sampler.turn_batches(self.plan.participants_of(round_index)[0], round_index)[0]
            return self.batch_to_device(loader.collate_fn([loader.dataset[i] for i in indices]))

        module, partition = self.lightning_module, self.partition
        blocks = [
            [p for n, p in partition.parameters(module, b).items() if n in trainable] for b in range(len(partition))
        ]
        return GradientProbe(module, blocks, first_batch, self.precision_plugin.train_step_context)

    @override
    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        """No optimizer up front: each client gets its own when its turn starts."""
        self.client_optimizers.check()
        self.optimizers, self.lr_scheduler_configs = [], []

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Replace the training sampler by the round-by-round federated batch sampler."""
        trainer = self.lightning_module.trainer
        if trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        dataloader = check_train_loader(dataloader)
        clients = make_clients(trainer.datamodule, len(dataloader.dataset), self.options.num_clients, self.options.seed)
        self.federation.host([c for c in clients if self.plan.hosts(c.index)])
        self.checkpoint.restore_into(self.federation, self.client_exchange)
        self.batch_sampler = client_batch_sampler(
            clients, dataloader.batch_size, self.plan, self.batches_per_turn, lambda: trainer.current_epoch,
            seed=self.options.seed, shuffle=self.options.shuffle,
        )  # fmt: skip
        return federated_loader(dataloader, self.batch_sampler)

    @property
    def batches_per_turn(self) -> int:
        """Micro-batches a participant consumes per round: K optimizer steps × accumulation."""
        return self.options.local_steps * self.lightning_module.trainer.accumulate_grad_batches

    def is_last_batch_of_round(self, batch_idx: int) -> bool:
        assert self.turns.current is not None and self.batch_sampler is not None, "no round in progress"
        return batch_idx + 1 == len(self.turns.current.turns) * self.batch_sampler.batches_per_turn

    # ----------------------------------------------------------------- rounds

    def start_round(self, round_index: int) -> RoundState:
        """Unfreeze the round's block and start this process's first turn; what this process knows of the round."""
        assert self.turns is not None and self.batch_sampler is not None, "the strategy is not set up"
        state = self.turns.start_round(round_index)
        state.sync_download_bytes = self.round_sync_downloads(round_index)
        self.optimizers = [self.turns.start_turn(0)]
        self._set_learning_rate(0)  # what a LearningRateMonitor reads at the epoch's start
        return state

    def round_sync_downloads(self, round_index: int) -> dict[int, int]:
        """Hook: bytes each participant fetches before its turn besides the exchange (FedCyBGD's periodic sync)."""
        return {}

    def end_last_turn(self) -> RoundState:
        """End this process's last turn of the round: the model holds the global values again, deltas are pending."""
        self.end_turn()
        return self.turns.end_round()

    def rounds_awaiting_exchange(self) -> list[int]:
        """Rounds trained and not yet aggregated, oldest first (the same on every process)."""
        return [] if self.federation is None else self.federation.pending_rounds()

    def start_exchange(self, round_index: int) -> None:
        """Hand the uploads of ``round_index`` to the communication thread; every process calls it for the round."""
        self.client_exchange.start(round_index)

    def finish_exchange(self, round_index: int) -> Optional[ExchangeOutcome]:
        """Wait for the exchange of ``round_index`` and apply it (the correction); ``None`` when none is in flight."""
        return self.client_exchange.finish(round_index)

    def begin_flush(self) -> None:
        """After the last round: the rounds still pending are exchanged now (Algorithm 2, lines 12-14). A checkpoint
        saved from here holds the final global model and says so: resuming from it is not one longer run."""
        self._flushed = True

    def close_round(self) -> None:
        """The round's boundary is applied: from here until the next round starts, the state can be saved."""
        self.turns.close_round()

    @property
    def round_open(self) -> bool:
        """A round has begun and its boundary is not applied yet: no consistent state to save."""
        return self.turns is not None and self.turns.round_open

    def at_round_end(self) -> None:
        """The epoch is over on every rank: the one point where a requeue checkpoint can be saved."""
        self.faults.at_round_end()

    def merge_round_record(self, record: RoundRecord) -> RoundRecord:
        """One record of the round for every process: each measured only its own clients (a collective)."""
        return self.client_exchange.merge_round_record(record)

    @property
    def exchange(self) -> Optional[ClientExchange]:
        """Deprecated (0.2): ``client_exchange``; removed in 0.3."""
        warnings.warn("`strategy.exchange` is now `strategy.client_exchange`.", FutureWarning, stacklevel=2)
        return self.client_exchange

    @property
    def num_blocks(self) -> Optional[int]:
        """Blocks of the model, once the strategy is set up."""
        return None if self.partition is None else len(self.partition)

    @property
    def active_client(self) -> Optional[int]:
        """The client whose turn is in progress on this process, or ``None`` (idle, or between turns)."""
        return None if self.federation is None else self.federation.active_client

    # ------------------------------------------------------------ client turns

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            current = self.turns.current
            round_index = None if current is None else current.index
            check_turn_plan(self.lightning_module.trainer, round_index, self.batch_sampler.batches_per_turn)

    def start_turn_at(self, batch_idx: int) -> None:
        """Before a batch: the next client's turn starts when the previous one is done.

        Called by ``ParaBlockCallback``, which refuses to run after a ``LearningRateMonitor``, so every other hook
        of the batch sees the client's optimizer, at the learning rate of this point of the run; the round's first
        turn starts when the round begins.
        """
        per_turn = self.batch_sampler.batches_per_turn
        if batch_idx and batch_idx % per_turn == 0:
            self.end_turn()
            self.optimizers = [self.turns.start_turn(batch_idx // per_turn)]
        self._set_learning_rate((batch_idx % per_turn) // self.lightning_module.trainer.accumulate_grad_batches)

    def _set_learning_rate(self, step: int) -> None:
        """The rate of local step ``step`` of the turn in progress (idle turns train nothing and count for nothing)."""
        if self.lr_schedule.changes_lr and not self.turns.idle:
            self.lr_schedule.apply(self.optimizers[0], self.turns.current.index * self.options.local_steps + step)

    def end_turn(self, record: bool = True) -> None:
        """End the turn in progress, keeping the client's delta (``record=False``: drop it, an exception cut the
        turn short); checkpoints and validation then see no client's optimizer or view."""
        if self.turns is not None:
            ended = self.turns.end_turn(record)
            if record and ended is not None:
                self.on_client_turn_end(*ended)
        self.optimizers = []

    def on_client_turn_end(self, client: int, round_index: int) -> None:
        """Hook: ``client``'s turn of ``round_index`` ended and its delta is pending
        (``self.federation.delta_of(client, round_index)``, which may be changed in place; FLoRA zeroes the
        components beyond a client's LoRA rank)."""

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.turns.idle:  # another rank trains a client now; this one keeps the step count in line with it
            return self.turns.idle_loss()
        return super().training_step(*args, **kwargs)

    @override
    def on_train_start(self) -> None:
        rank_zero_info(self.outline().format())

    def outline(self) -> RunOutline:
        """What a round trains and how much of the data the run reads, printed when training starts (Lightning's
        model summary counts every parameter a block could hold as trainable)."""
        module, partition, trainable = self.lightning_module, self.partition, self.turns.trainable
        trainer, options, sampler = module.trainer, self.options, self.batch_sampler
        return RunOutline(
            block_parameters=[
                sum(p.numel() for n, p in partition.parameters(module, b).items() if n in trainable)
                for b in range(len(partition))
            ],
            model_parameters=sum(p.numel() for p in module.parameters()),
            participants=self.participants_per_round,
            clients=options.num_clients,
            local_steps=options.local_steps,
            batch_size=sampler.batch_size,
            accumulate=trainer.accumulate_grad_batches,
            num_samples=sum(len(indices) for indices in sampler.client_indices),
            rounds=self.rounds_in_run(trainer),
            first_round=trainer.current_epoch,
        )

    @override
    def on_validation_start(self) -> None:
        # Validation at a round's end evaluates the global model, not the last client's view.
        self.end_turn()

    @override
    def on_exception(self, exception: BaseException) -> None:
        current = None if self.turns is None else self.turns.current
        self.faults.report(exception, None if current is None else current.index)
        self.end_turn(record=False)
        if self.client_exchange is not None:
            self.client_exchange.close()  # no exchange in flight outlives the fit
        if self.turns is not None:
            self.turns.restore_trainable()
        super().on_exception(exception)

    @override
    def on_train_end(self) -> None:
        if self.turns is not None:
            self.turns.restore_trainable()

    @override
    def teardown(self) -> None:
        self._federation_set_up = False
        self.faults.uninstall()
        if self.client_exchange is not None:
            self.client_exchange.close()
        self.client_optimizers.detach()
        if self.federation is not None:
            optimizers_to_device(list(self.federation.kept_optimizers.values()), torch.device("cpu"))
        super().teardown()

    # ------------------------------------------------------------- checkpoints

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: PathLike, storage_options: Optional[Any] = None
    ) -> None:
        """Add every client's pending deltas and kept optimizer states (gathered from every rank)."""
        open_round = self.turns.current.index if self.round_open else None
        if not may_save(open_round, self.lightning_module.trainer.state.status == TrainerStatus.INTERRUPTED):
            return
        if self.federation is not None:
            entry = self.checkpoint.entry(
                self.federation,
                self.client_exchange,
                self.partition,
                self.schedule,
                self.placement,
                self.world_size,
                self.run_settings(),
            )
            if entry is not None:
                checkpoint[CHECKPOINT_KEY] = {**entry, "flushed": self._flushed}
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: PathLike, weights_only: Optional[bool] = None) -> dict[str, Any]:
        load = super().load_checkpoint
        checkpoint = read_checkpoint_file(checkpoint_path, lambda: load(checkpoint_path, weights_only=weights_only))
        if self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            # validate/test from a checkpoint need the global weights only
            self.checkpoint.read(checkpoint.get(CHECKPOINT_KEY), checkpoint_path)
        return checkpoint

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        """Client optimizers are built per turn; at a round boundary there is none to restore."""
        return False

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistryType) -> None:
        """``Trainer(strategy="federated_block")`` (and ``--trainer.strategy federated_block``) once this is imported."""
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="ParaBlock: federated block-coordinate fine-tuning (lightning_parablock)",
            override=True,
        )


def _limits(trainer: "pl.Trainer") -> str:
    return f"max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}"


def _attached_trainer(module: Optional["pl.LightningModule"]) -> Optional["pl.Trainer"]:
    """The Trainer ``module`` is attached to, or ``None`` (``module.trainer`` raises when there is none)."""
    if module is None:
        return None
    try:
        return module.trainer
    except RuntimeError:
        return None


FederatedBlockStrategy.register_strategies(StrategyRegistry)
