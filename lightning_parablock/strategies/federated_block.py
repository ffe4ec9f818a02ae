"""``FederatedBlockStrategy``: Lightning glue over a :class:`~lightning_parablock.core.federation.Federation`.

The LightningModule's parameters *are* the global model. Each process hosts a fixed, seeded share of
the clients (all of them with one device); when the training loop reaches a client's batches the
strategy loads that client's view through the federation and hands the loop that client's optimizer.
Rounds are epochs; the exchange of deltas and the round boundary belong to
:class:`~lightning_parablock.ParaBlockCallback`, which gets its transport from here: in memory with one
process, torch.distributed collectives on a group of their own with several (``devices``, ``num_nodes``,
``torchrun`` or SLURM, launched the way Lightning launches DDP). No gradients are all-reduced: clients
train independently.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins import ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.plugins.precision import DoublePrecision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage, TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_parablock._compat import (
    Device,
    PathLike,
    StrategyRegistryType,
    init_optimizers_and_lr_schedulers,
    optimizers_to_device,
    sync_module_states,
)
from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.argument_checks import check_bool, check_choice, check_float, check_int, check_optional_int
from lightning_parablock.comm.codecs import Codec, EncodedDelta, encode_delta
from lightning_parablock.comm.distributed import CollectiveTransport, new_exchange_group
from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.comm.worker import CommWorker
from lightning_parablock.core.blocks import (
    BlockPartition,
    LayerSplit,
    RemainderPolicy,
    compile_block_patterns,
    partition_by_patterns,
    partition_decoder,
)
from lightning_parablock.core.clients import VirtualClient
from lightning_parablock.core.federation import Federation, OptimizerStatePolicy
from lightning_parablock.core.planning import participants_per_round, place_clients, sample_participants
from lightning_parablock.core.sampler import FederatedBatchSampler
from lightning_parablock.core.schedule import SCHEDULE_KINDS, BlockSchedule, ScheduleKind
from lightning_parablock.core.turn_timer import TurnTimer
from lightning_parablock.fault_tolerance.fault_watch import FaultWatch
from lightning_parablock.fault_tolerance.preemption import RoundEndRequeue, TurnStartSigterm
from lightning_parablock.strategies.gradient_probe import GradientProbe
from lightning_parablock.strategies.precision_policy import check_precision
from lightning_parablock.telemetry.timeline import RoundRecord, merge_rank_records

if TYPE_CHECKING:
    import lightning.pytorch as pl

Weighting = Literal["uniform", "samples"]


@dataclass
class RoundState:
    """What the strategy knows about the round in progress."""

    index: int
    block: int
    participants: list[int]
    turns: list[Optional[int]]  # the client of each of this rank's turns; None: idle while other ranks train
    compute_seconds: dict[int, float] = field(default_factory=dict)
    probe_seconds: float = 0.0  # the gradient schedule's probe before the round, measured
    sync_download_bytes: dict[int, int] = field(default_factory=dict)  # per client, before its turn (FedCyBGD)
    closed: bool = False  # the boundary has been applied: a consistent state to checkpoint


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
            ``"permutation"`` (every block once per cycle) or ``"gradient"`` (the largest gradient norm on
            the round's first batch, one extra backward per round).
        client_optimizer: builds a client's optimizer from the block's parameters. Defaults to the
            LightningModule's ``configure_optimizers``, called whenever a client needs a new optimizer
            (every turn with ``optimizer_state="reset"``, once per client and block with ``"per_block"``).
        optimizer_state: ``"reset"`` starts every client's optimizer afresh at each block switch (the
            paper); ``"per_block"`` keeps each client's state for each block it has trained, which grows
            towards optimizer state for the whole model per client once every block has been trained.
        global_lr: η, the step the server and the clients take along aggregated deltas.
        participation: fraction of clients that train each round, in (0, 1].
        clients_per_round: number of clients per round; overrides ``participation``.
        weighting: aggregation weights, ``"uniform"`` or by client sample count (``"samples"``).
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
        device: the device of the global model with one process; by default the Trainer's ``devices``.
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
        client_optimizer: Optional[OptimizerCallable] = None,
        optimizer_state: OptimizerStatePolicy = "reset",
        global_lr: float = 1.0,
        participation: float = 1.0,
        clients_per_round: Optional[int] = None,
        weighting: Weighting = "uniform",
        seed: int = 0,
        shuffle: bool = True,
        offload_deltas: bool = False,
        master_weights: bool = True,
        device: Optional[Device] = None,
        accelerator: Optional[Accelerator] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        cluster_environment: Optional[ClusterEnvironment] = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=None if device is None else [torch.device(device)],
            cluster_environment=cluster_environment,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        num_clients = check_int("num_clients", num_clients, minimum=1)
        local_steps = check_int("local_steps", local_steps, minimum=1)
        check_int("layers_per_block", layers_per_block, minimum=1)
        check_choice("layer_split", layer_split, ("none", "attention_mlp"))
        check_choice("remainder", remainder, ("error", "last_smaller", "merge_into_last"))
        check_choice("schedule", schedule, SCHEDULE_KINDS)
        global_lr = check_float("global_lr (η)", global_lr, minimum=0.0, min_open=True)
        participation = check_float("participation", participation, minimum=0.0, maximum=1.0, min_open=True)
        clients_per_round = check_optional_int("clients_per_round", clients_per_round, minimum=1)
        check_choice("optimizer_state", optimizer_state, ("reset", "per_block"))
        check_choice("weighting", weighting, ("uniform", "samples"))
        seed = check_int("seed", seed, minimum=0)
        for name, flag in (
            ("include_embeddings", include_embeddings), ("include_head", include_head), ("shuffle", shuffle),
            ("offload_deltas", offload_deltas), ("master_weights", master_weights),
        ):  # fmt: skip
            check_bool(name, flag)
        if client_optimizer is not None and not callable(client_optimizer):
            raise TypeError(
                "`client_optimizer` must be a callable that builds an optimizer from parameters, e.g."
                f" `functools.partial(torch.optim.AdamW, lr=1e-4)`, got {client_optimizer!r}."
            )
        if block_patterns is not None:
            compile_block_patterns(block_patterns)  # refuse a bad pattern now, not when training starts
        self.num_clients = num_clients
        self.local_steps = local_steps
        self.block_options = dict(
            layers_per_block=layers_per_block,
            layer_split=layer_split,
            remainder=remainder,
            include_embeddings=include_embeddings,
            include_head=include_head,
        )
        self.block_patterns = block_patterns
        self.schedule_kind = schedule
        self.client_optimizer = client_optimizer
        self.optimizer_state_policy = optimizer_state
        self.global_lr = float(global_lr)
        self.clients_per_round = participants_per_round(num_clients, participation, clients_per_round)
        self.weighting = weighting
        self.seed = seed
        self.shuffle = shuffle
        self.offload_deltas = offload_deltas
        self.master_weights = master_weights

        self.partition: Optional[BlockPartition] = None
        self.schedule: Optional[BlockSchedule] = None
        self.federation: Optional[Federation] = None
        self.placement: list[int] = [0] * num_clients  # the rank hosting each client
        self.batch_sampler: Optional[FederatedBatchSampler] = None
        self.current: Optional[RoundState] = None
        self._round_blocks: dict[int, int] = {}
        self._participants: dict[int, list[int]] = {}
        self._timer = TurnTimer(torch.device("cpu"))
        self._idle = False  # this rank waits through a turn while other ranks train
        self._idle_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)
        self._last_module_optimizer: Optional[weakref.ref[Optimizer]] = None
        self._user_trainable: Optional[set[str]] = None
        self._restored_state: Optional[dict[str, Any]] = None
        self._saved_blocks: Optional[list[list[str]]] = None
        self._fault_watch: Optional[FaultWatch] = None
        self._sigterm: Optional[TurnStartSigterm] = None
        self._requeue: Optional[RoundEndRequeue] = None
        self._restored_schedule: Optional[dict[str, Any]] = None

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
        self.placement = place_clients(self.num_clients, self.world_size, self.seed)

    @override
    def connect(self, model: "pl.LightningModule") -> None:
        super().connect(model)
        if self.client_optimizer is not None and not is_overridden("configure_optimizers", model):
            # Clients build their optimizers with `client_optimizer`; Lightning's own check still asks the
            # module for `configure_optimizers`, so a module without one gets one that builds nothing.
            model.configure_optimizers = _no_module_optimizer

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if self.distributed:
            sync_module_states(self.model)  # every rank starts from rank 0's global model
        if trainer.state.fn == TrainerFn.FITTING:
            self._setup_federation(trainer)
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def check_exchange(self, staleness: int, aggregator: Aggregator) -> None:
        """Refuse an exchange this strategy cannot run (asked by ``ParaBlockCallback`` at setup); any goes here."""

    @override
    def configure_ddp(self) -> None:
        """Clients train independently: no DistributedDataParallel, no gradient all-reduce."""

    def _setup_federation(self, trainer: "pl.Trainer") -> None:
        self._validate_trainer(trainer)
        check_precision(self.lightning_module, str(trainer.precision))
        model = self.lightning_module
        self.partition = (
            partition_by_patterns(model, self.block_patterns)
            if self.block_patterns is not None
            else partition_decoder(model, **self.block_options)
        )
        probe = GradientProbe(self) if self.schedule_kind == "gradient" else None
        self.schedule = BlockSchedule(self.schedule_kind, len(self.partition), self.seed, probe)
        if self._restored_schedule is not None:
            self.schedule.load_state_dict(self._restored_schedule)
            self._restored_schedule = None
        self._check_restored_blocks()
        self._user_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.federation = Federation(
            model,
            self.partition,
            global_lr=self.global_lr,
            optimizer_state=self.optimizer_state_policy,
            offload_deltas=self.offload_deltas,
            new_optimizer=self._new_client_optimizer,
            master_weights=self.master_weights,
        )
        self._timer = TurnTimer(self.root_device)
        if self.distributed and self._fault_watch is None:
            self._fault_watch = FaultWatch()
        if self.distributed and self._sigterm is None:
            self._sigterm = TurnStartSigterm(trainer, lambda: self.batch_sampler.batches_per_turn)
            self._sigterm.install()
        if self._requeue is None:
            self._requeue = RoundEndRequeue(trainer)
            self._requeue.install()

    def _check_restored_blocks(self) -> None:
        saved, self._saved_blocks = self._saved_blocks, None
        current = [list(b.param_names) for b in self.partition.blocks]
        if saved is not None and saved != current:
            raise MisconfigurationException(
                f"The checkpoint was written with {len(saved)} blocks and this run partitions the model into"
                f" {len(current)} blocks{'' if len(saved) != len(current) else ' of other parameters'}; resume"
                " with the block options of the original run."
            )

    def _validate_trainer(self, trainer: "pl.Trainer") -> None:
        if not self.lightning_module.automatic_optimization:
            raise MisconfigurationException(
                "FederatedBlockStrategy needs automatic optimization: it hands each client's optimizer to"
                " Lightning's loop. Set `self.automatic_optimization = True` in your LightningModule."
            )
        if isinstance(trainer.precision_plugin, DoublePrecision):
            raise MisconfigurationException(
                f"`precision={trainer.precision!r}` is not supported: deltas, their exchange and the aggregate are"
                " kept in fp32, which would silently drop fp64 weights' precision. Use '32-true', 'bf16-true',"
                " 'bf16-mixed', '16-true' or '16-mixed'."
            )
        if trainer.accumulate_grad_batches < 1:
            raise MisconfigurationException(
                f"`accumulate_grad_batches={trainer.accumulate_grad_batches}` would take no optimizer step; use 1 or more."
            )
        if trainer.max_epochs == 0 or trainer.max_steps == 0:
            raise MisconfigurationException(
                f"`max_epochs={trainer.max_epochs}`, `max_steps={trainer.max_steps}` would train no round: one epoch"
                " is one federated round, so give `max_epochs` of at least 1 (more than the callback's staleness)."
            )
        if not _is_whole_epoch(trainer.limit_train_batches):
            raise MisconfigurationException(
                f"`limit_train_batches={trainer.limit_train_batches}` would cut rounds short: one epoch is one"
                " federated round. Leave it at 1.0 and set `local_steps` on the strategy instead."
            )
        if not _is_whole_epoch(trainer.val_check_interval):
            raise MisconfigurationException(
                f"`val_check_interval={trainer.val_check_interval}` would validate in the middle of a client's"
                " turn. Validate at round ends with `check_val_every_n_epoch` instead."
            )

    @override
    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        """No optimizer up front: each client gets its own when its turn starts."""
        if self.client_optimizer is None:
            self._check_module_optimizers_are_fresh()
        self.optimizers, self.lr_scheduler_configs = [], []

    def _check_module_optimizers_are_fresh(self) -> None:
        """Fail before training if ``configure_optimizers`` would hand every client one shared optimizer."""
        self._optimizer_from_module()
        self._optimizer_from_module()
        self._last_module_optimizer = None

    def _optimizer_from_module(self) -> Optimizer:
        optimizers, schedulers = init_optimizers_and_lr_schedulers(self.lightning_module)
        if len(optimizers) != 1 or schedulers:
            raise MisconfigurationException(
                f"FederatedBlockStrategy needs `configure_optimizers` to return exactly one optimizer and no LR"
                f" scheduler (got {len(optimizers)} optimizers and {len(schedulers)} schedulers): clients"
                " restart their optimizer every round."
            )
        optimizer = optimizers[0]
        if self._last_module_optimizer is not None and optimizer is self._last_module_optimizer():
            raise MisconfigurationException(
                "`configure_optimizers` returns the same optimizer object on every call (LightningCLI's"
                " `--optimizer` does this), so all clients would share one optimizer state. Build a new"
                " optimizer on every call, or pass `client_optimizer=` to FederatedBlockStrategy."
            )
        self._last_module_optimizer = weakref.ref(optimizer)
        return optimizer

    def _new_client_optimizer(self, params: list[nn.Parameter]) -> Optimizer:
        if self.client_optimizer is not None:
            return self.client_optimizer(params)
        return self._optimizer_from_module()

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Replace the training sampler by the round-by-round federated batch sampler."""
        trainer = self.lightning_module.trainer
        if trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        if not isinstance(dataloader, DataLoader) or isinstance(dataloader.dataset, IterableDataset):
            raise MisconfigurationException(
                f"FederatedBlockStrategy splits a map-style dataset among clients; the train dataloader must be a"
                f" torch DataLoader over a map-style dataset, got {type(dataloader).__name__}."
            )
        if dataloader.batch_size is None:
            raise MisconfigurationException(
                "The train DataLoader has no `batch_size` (a custom batch_sampler?); give it a batch_size."
            )
        clients = self._make_clients(trainer, len(dataloader.dataset))
        self.federation.host([c for c in clients if self.placement[c.index] == self.global_rank])
        if self._restored_state is not None:
            self.federation.load_state_dict(self._restored_state)
            self._restored_state = None
        small = [c.index for c in clients if c.num_samples < dataloader.batch_size]
        if small:
            rank_zero_warn(
                f"Clients {small} hold fewer examples than batch_size={dataloader.batch_size}; their batches repeat"
                " examples."
            )
        self.batch_sampler = FederatedBatchSampler(
            client_indices=[c.sample_indices for c in clients],
            batch_size=dataloader.batch_size,
            batches_per_turn=self.batches_per_turn,
            participants=self._hosted_participants,
            current_round=lambda: trainer.current_epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            turns_per_round=self._turns_per_round,
            max_turns_per_round=self._max_turns_per_round(),
        )
        extra = {}
        if dataloader.num_workers > 0:
            extra = dict(prefetch_factor=dataloader.prefetch_factor, persistent_workers=dataloader.persistent_workers)
        return DataLoader(
            dataloader.dataset,
            batch_sampler=self.batch_sampler,
            num_workers=dataloader.num_workers,
            collate_fn=dataloader.collate_fn,
            pin_memory=dataloader.pin_memory,
            timeout=dataloader.timeout,
            worker_init_fn=dataloader.worker_init_fn,
            multiprocessing_context=dataloader.multiprocessing_context,
            **extra,
        )

    def _make_clients(self, trainer: "pl.Trainer", num_examples: int) -> list[VirtualClient]:
        """Client shards from the datamodule's ``client_partition(num_clients)``, else an iid split."""
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "client_partition"):
            shards = datamodule.client_partition(self.num_clients)
            if len(shards) != self.num_clients:
                raise MisconfigurationException(
                    f"`{type(datamodule).__name__}.client_partition` returned {len(shards)} shards for"
                    f" num_clients={self.num_clients}."
                )
        else:
            if num_examples < self.num_clients:
                raise MisconfigurationException(
                    f"The training set has {num_examples} examples, fewer than num_clients={self.num_clients}."
                )
            order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(self.seed)).tolist()
            shards = [order[i :: self.num_clients] for i in range(self.num_clients)]
        for index, shard in enumerate(shards):
            if len(shard) == 0:
                raise MisconfigurationException(f"Client {index} has no training examples; every client needs some.")
        return [VirtualClient(index=i, sample_indices=list(shard)) for i, shard in enumerate(shards)]

    @property
    def batches_per_turn(self) -> int:
        """Micro-batches a participant consumes per round: K optimizer steps × accumulation."""
        return self.local_steps * self.lightning_module.trainer.accumulate_grad_batches

    def is_last_batch_of_round(self, batch_idx: int) -> bool:
        assert self.current is not None and self.batch_sampler is not None, "no round in progress"
        return batch_idx + 1 == len(self.current.turns) * self.batch_sampler.batches_per_turn

    # ----------------------------------------------------------------- rounds

    def participants_of(self, round_index: int) -> list[int]:
        """Every participant of ``round_index``, on any rank (the same list on every rank)."""
        if round_index not in self._participants:
            self._participants[round_index] = sample_participants(
                round_index, self.num_clients, self.clients_per_round, self.seed
            )
        return self._participants[round_index]

    def _hosted_participants(self, round_index: int) -> list[int]:
        return [c for c in self.participants_of(round_index) if self.placement[c] == self.global_rank]

    def _turns_per_round(self, round_index: int) -> int:
        """Turns every rank runs in ``round_index``: the most participants any one rank hosts."""
        per_rank = [0] * self.world_size
        for client in self.participants_of(round_index):
            per_rank[self.placement[client]] += 1
        return max(per_rank)

    def _max_turns_per_round(self) -> int:
        hosted_most = max(self.placement.count(rank) for rank in range(self.world_size))
        return min(self.clients_per_round, hosted_most)

    def block_of(self, round_index: int) -> int:
        assert self.schedule is not None, "the strategy is not set up"
        if round_index not in self._round_blocks:
            self._round_blocks[round_index] = self.schedule.block_for_round(round_index)
        return self._round_blocks[round_index]

    def begin_round(self, round_index: int) -> RoundState:
        """Unfreeze the round's block; clients are entered as their batches arrive."""
        assert self.partition is not None and self.batch_sampler is not None, "the strategy is not set up"
        hosted = self._hosted_participants(round_index)
        turns: list[Optional[int]] = [*hosted, *[None] * (self._turns_per_round(round_index) - len(hosted))]
        self.current = RoundState(round_index, self.block_of(round_index), self.participants_of(round_index), turns)
        self.current.probe_seconds = self.schedule.probe_seconds.get(round_index, 0.0)
        self.partition.freeze_all_but(self.lightning_module, self.current.block, self._user_trainable)
        self._start_turn(0)
        return self.current

    def finish_round(self) -> RoundState:
        """Close the last client's turn; the model holds the global values again."""
        assert self.current is not None and self.federation is not None, "no round in progress"
        self._leave_client()
        self.current.compute_seconds.update(self._timer.resolve())
        self.federation.round_trained(self.current.index, self.current.block)
        return self.current

    def round_ended(self) -> None:
        """Every rank has applied the round's boundary: the one point where a requeue checkpoint can be saved."""
        if self._requeue is not None:
            self._requeue.at_round_end()

    @property
    def round_open(self) -> bool:
        """A round has begun and its boundary is not applied yet: no consistent state to save."""
        return self.current is not None and not self.current.closed

    def abandon_turn(self) -> None:
        """Put the global values back without recording the client's delta (an exception interrupted it)."""
        self._leave_client(record=False)

    @property
    def clients(self) -> list[VirtualClient]:
        """The clients this process hosts, by id."""
        return [] if self.federation is None else [self.federation.clients[i] for i in sorted(self.federation.clients)]

    def pending_rounds(self) -> list[int]:
        """Rounds trained and not yet aggregated, oldest first."""
        return [] if self.federation is None else self.federation.pending_rounds()

    def round_deltas(self, round_index: int) -> dict[int, dict[str, Tensor]]:
        """Each hosted client's own delta of ``round_index``, by client id."""
        return self.federation.round_deltas(round_index)

    def round_uploads(self, round_index: int, codec: Codec) -> dict[int, EncodedDelta]:
        """Each hosted client's delta of ``round_index`` encoded for the wire (error-feedback residuals updated)."""
        return {
            client: encode_delta(codec, self.upload_of(client, delta), self.federation.clients[client].residual)
            for client, delta in self.federation.round_deltas(round_index).items()
        }

    def upload_of(self, client: int, delta: dict[str, Tensor]) -> dict[str, Tensor]:
        """What of a client's delta goes up the link: all of it here (FLoRA sends a rank-r_i slice)."""
        return delta

    def round_weights(self, round_index: int) -> dict[int, float]:
        """Unnormalized aggregation weights of the hosted senders of ``round_index`` (1, or the sample count)."""
        senders = self.federation.round_deltas(round_index)
        if self.weighting == "uniform":
            return {client: 1.0 for client in senders}
        return {client: float(n) for client, n in self.federation.sample_counts(list(senders)).items()}

    def apply_aggregate(
        self, round_index: int, aggregate: Optional[dict[str, Tensor]], left_out: list[int] | tuple[int, ...] = ()
    ) -> None:
        """The boundary for round ``round_index``: global += η Δ, and every client drops its own Δ^i."""
        self.federation.apply_aggregate(round_index, aggregate, left_out)

    def client_view(self, client_index: int) -> dict[str, Tensor]:
        """The full model of one hosted client (global plus its pending deltas), for tests and inspection."""
        return self.federation.client_view(client_index)

    @property
    def active_client(self) -> Optional[int]:
        """The client whose view is loaded, or ``None`` between turns."""
        return None if self.federation is None else self.federation.active_client

    def client_state_nbytes(self) -> int:
        """Bytes this process's clients hold beyond the global model: pending deltas and kept optimizer state."""
        return 0 if self.federation is None else self.federation.client_state_nbytes()

    # ------------------------------------------------------------- exchanges

    def comm_worker(self, link: SimulatedLink, aggregator: Aggregator, timeout_s: float) -> CommWorker:
        """The communication thread with this run's transport: in memory, or collectives across ranks."""
        if not self.distributed:
            return CommWorker(link, timeout_s, aggregator)
        device = torch.device("cpu") if dist.get_backend() == "gloo" else self.root_device
        transport = CollectiveTransport(new_exchange_group(timeout_s), self.placement, self._block_layout, timeout_s, device)
        return CommWorker(
            link, timeout_s, aggregator, transport=transport, describe_stall=transport.describe_stall,
            stage_to_host=device.type == "cpu",
        )  # fmt: skip

    def _block_layout(self, block: int) -> list[tuple[str, torch.Size]]:
        return [(n, p.shape) for n, p in self.partition.parameters(self.lightning_module, block).items()]

    def merge_round_record(self, record: RoundRecord) -> RoundRecord:
        """One record of the round for every rank: each rank measured only its own clients."""
        record.rank = self.global_rank
        if not self.distributed:
            return record
        records: list[Optional[RoundRecord]] = [None] * self.world_size
        dist.all_gather_object(records, record)
        return merge_rank_records(records)

    # ------------------------------------------------------------ client turns

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.current is None:
            raise MisconfigurationException(
                "FederatedBlockStrategy has no round in progress: add `ParaBlockCallback(...)` to the Trainer's"
                " callbacks; it begins and ends every round."
            )
        if batch_idx == 0 and self.batches_per_turn != self.batch_sampler.batches_per_turn:
            # after every epoch-start hook, so a GradientAccumulationScheduler has had its say
            raise MisconfigurationException(
                f"`accumulate_grad_batches` changed to {self.lightning_module.trainer.accumulate_grad_batches}"
                f" during training (round {self.current.index}); each client's turn was planned for"
                f" {self.batch_sampler.batches_per_turn} batches. Keep the accumulation fixed for the whole run."
            )

    def start_turn_at(self, batch_idx: int) -> None:
        """Before a batch: the next client's turn starts when the previous one is done.

        Called by ``ParaBlockCallback``, first among the callbacks, so that every other hook of the batch
        (a ``LearningRateMonitor``'s included) sees the client's optimizer; the round's first turn starts
        when the round begins.
        """
        per_turn = self.batch_sampler.batches_per_turn
        if batch_idx and batch_idx % per_turn == 0:
            self._start_turn(batch_idx // per_turn)

    def _start_turn(self, turn: int) -> None:
        """End the turn in progress and load the client of this rank's ``turn``-th turn (or idle)."""
        self._leave_client()
        client = self.current.turns[turn]
        if client is None:
            self._idle = True
            self.optimizers = [self._idle_optimizer]
        else:
            self.optimizers = [self.federation.enter(client, self.current.index, self.current.block)]
        self._timer.start()

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._idle:  # another rank trains a client now; this one keeps the step count in line with it
            return torch.zeros((), device=self.root_device, requires_grad=True)
        return super().training_step(*args, **kwargs)

    @override
    def on_validation_start(self) -> None:
        # Validation at a round's end evaluates the global model, not the last client's view.
        self._leave_client()

    @override
    def on_exception(self, exception: BaseException) -> None:
        # A SIGTERM is no fault: every rank stops at the same turn start (see preemption.py).
        if self._fault_watch is not None and not isinstance(exception, SIGTERMException):
            if not self._fault_watch.report_peer_fault(exception):
                self._fault_watch.publish(None if self.current is None else self.current.index, exception)
        self.abandon_turn()
        self._restore_user_trainable()
        super().on_exception(exception)

    @override
    def on_train_end(self) -> None:
        self._restore_user_trainable()

    def _restore_user_trainable(self) -> None:
        """Give back the ``requires_grad`` flags the module had before training."""
        if self._user_trainable is None:
            return
        for name, param in self.lightning_module.named_parameters():
            param.requires_grad_(name in self._user_trainable)

    @override
    def teardown(self) -> None:
        if self._sigterm is not None:
            self._sigterm.uninstall()
            self._sigterm = None
        if self._requeue is not None:
            self._requeue.uninstall()
            self._requeue = None
        if self._fault_watch is not None:
            self._fault_watch.stop()
            self._fault_watch = None
        if self.federation is not None:
            optimizers_to_device(list(self.federation.kept_optimizers.values()), torch.device("cpu"))
        super().teardown()

    def _leave_client(self, record: bool = True) -> None:
        """End the turn in progress (a client's or an idle one) and note its compute time."""
        if self._idle:
            self._idle = False
            self._timer.stop(None)
            self.optimizers = []
            return
        client = None if self.federation is None else self.federation.leave(record)
        if client is None:
            return
        self.optimizers = []  # checkpoints carry no stale client optimizer
        self._timer.stop(client)  # read at the round's end: no device-wide synchronize per turn

    # ------------------------------------------------------------- checkpoints

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: PathLike, storage_options: Optional[Any] = None) -> None:
        """Add every client's pending deltas and kept optimizer states (gathered from every rank)."""
        if self.round_open:
            message = (
                f"A checkpoint was requested in the middle of round {self.current.index}, before its boundary;"
                " it could not be resumed. Save at round boundaries: `ModelCheckpoint(every_n_epochs=...)`."
            )
            if self.lightning_module.trainer.state.status == TrainerStatus.INTERRUPTED:
                rank_zero_warn(message + " Skipped while handling an exception.")
                return
            raise MisconfigurationException(message)
        if self.federation is not None:
            state = self.federation.state_dict()
            if self.distributed:
                states: list[Optional[dict[str, Any]]] = [None] * self.world_size
                dist.all_gather_object(states, state)
                state = {
                    **state,
                    "pending": {i: p for s in states for i, p in s["pending"].items()},
                    "optimizers": {k: o for s in states for k, o in s["optimizers"].items()},
                    "residuals": {i: r for s in states for i, r in s["residuals"].items()},
                }
            checkpoint["federation"] = {
                **state,
                "num_clients": self.num_clients,
                "blocks": [list(b.param_names) for b in self.partition.blocks],
                "world_size": self.world_size,
                "placement": list(self.placement),
                "schedule": self.schedule.state_dict(),
            }
        super().save_checkpoint(checkpoint, filepath, storage_options)

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

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        """Client optimizers are built per turn; at a round boundary there is none to restore."""
        return False

    @override
    def load_checkpoint(self, checkpoint_path: PathLike, weights_only: Optional[bool] = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        federation = checkpoint.get("federation")
        if federation is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint  # validate/test from a checkpoint need the global weights only
        if federation["num_clients"] != self.num_clients:
            raise MisconfigurationException(
                f"The checkpoint {checkpoint_path} was written with num_clients={federation['num_clients']},"
                f" this run has num_clients={self.num_clients}."
            )
        saved_world = federation.get("world_size", 1)
        placement = place_clients(self.num_clients, self.world_size, self.seed)
        saved_placement = federation.get("placement", placement if saved_world == 1 else None)
        if saved_world != self.world_size or saved_placement != placement:
            raise MisconfigurationException(
                f"The checkpoint {checkpoint_path} was written by {saved_world} process(es) with clients placed on"
                f" ranks {saved_placement}; this run has {self.world_size} process(es) placing them on ranks"
                f" {placement}. Resume with the same number of processes (devices × num_nodes) and seed."
            )
        self._saved_blocks = federation["blocks"]
        self._restored_state = federation
        self._restored_schedule = federation.get("schedule")
        return checkpoint


FederatedBlockStrategy.register_strategies(StrategyRegistry)


def _no_module_optimizer() -> None:
    """``configure_optimizers`` of a module whose clients take ``client_optimizer``."""


def _is_whole_epoch(value: Union[int, float]) -> bool:
    """``1.0`` (a float) means the whole epoch; the integer ``1`` means one batch."""
    return isinstance(value, float) and value == 1.0
