"""``FederatedBlockStrategy``: N virtual clients on one device, one global model.

The LightningModule's parameters *are* the global model. When the training loop
reaches a client's batches the strategy loads that client's view (global plus its
own pending deltas) into the blocks it touches and gives the loop that client's
optimizer; when the client is done its delta is recorded and the saved global
values are copied back, bit for bit. Rounds are epochs; the exchange of deltas
and the round boundary belong to :class:`~lightning_parablock.ParaBlockCallback`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
from lightning.fabric.utilities.types import _DEVICE, _PATH
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.cli import OptimizerCallable
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.plugins.precision import HalfPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_parablock.blocks import (
    BlockPartition,
    LayerSplit,
    RemainderPolicy,
    partition_by_patterns,
    partition_decoder,
)
from lightning_parablock.clients import (
    BlockDelta,
    VirtualClient,
    aggregation_weights,
    optimizer_state_nbytes,
    participants_per_round,
    sample_participants,
)
from lightning_parablock.probe import GradientProbe
from lightning_parablock.sampler import FederatedBatchSampler
from lightning_parablock.schedule import BlockSchedule, ScheduleKind

if TYPE_CHECKING:
    import lightning.pytorch as pl

OptimizerStatePolicy = Literal["reset", "per_block"]
Weighting = Literal["uniform", "samples"]


@dataclass
class _ActiveClient:
    """The client whose view is loaded in the model right now."""

    client: VirtualClient
    global_values: dict[str, Tensor]  # exact global values of every block the view touches
    start_values: dict[str, Tensor]  # θ_0 of the round's block, fp32
    started_at: float


@dataclass
class RoundState:
    """What the strategy knows about the round in progress."""

    index: int
    block: int
    participants: list[int]
    compute_seconds: dict[int, float] = field(default_factory=dict)
    probe_seconds: float = 0.0  # the gradient schedule's probe before the round, measured
    sync_download_bytes: dict[int, int] = field(default_factory=dict)  # per client, before its turn (FedCyBGD)
    closed: bool = False  # the boundary has been applied: a consistent state to checkpoint


class FederatedBlockStrategy(SingleDeviceStrategy):
    """Simulates a federation of block-coordinate fine-tuning clients on one device.

    Each epoch is one round: the round's block is unfrozen, every participant trains it for
    ``local_steps`` optimizer steps (times ``accumulate_grad_batches`` micro-batches) from its
    own view of the model, and its change to the block is kept as a pending delta until the
    callback aggregates it. Memory is one model plus, per client, at most ``staleness + 1``
    block deltas (and optimizer state when it is kept per block).

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
        seed: seeds the block schedule, the participants and each client's data order.
        shuffle: each client reads its shard in a seeded random order, reshuffled every pass; with
            ``False`` in the order the datamodule gave.
        offload_deltas: keep pending deltas in host memory instead of on the device. For large models on
            a GPU: N clients × (staleness + 1) fp32 blocks leave GPU memory, and each turn copies its
            client's deltas back (a 2-layer block of Llama 3-8B is 1.75 GB in fp32).
        device: the device of the global model; by default the Trainer's ``devices`` (one device).
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
        device: Optional[_DEVICE] = None,
        accelerator: Optional[Accelerator] = None,
    ) -> None:
        super().__init__(device="cpu" if device is None else device, accelerator=accelerator)
        if num_clients < 1:
            raise ValueError(f"`num_clients` must be at least 1, got {num_clients}.")
        if local_steps < 1:
            raise ValueError(f"`local_steps` must be at least 1, got {local_steps}.")
        if not global_lr > 0:
            raise ValueError(f"`global_lr` (η) must be positive, got {global_lr}.")
        if optimizer_state not in ("reset", "per_block"):
            raise ValueError(f"`optimizer_state` must be 'reset' or 'per_block', got {optimizer_state!r}.")
        if weighting not in ("uniform", "samples"):
            raise ValueError(f"`weighting` must be 'uniform' or 'samples', got {weighting!r}.")
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
        self._device_given = device is not None
        self.parallel_devices: Optional[list[torch.device]] = None  # filled from Trainer(devices=...)

        self.partition: Optional[BlockPartition] = None
        self.schedule: Optional[BlockSchedule] = None
        self.clients: list[VirtualClient] = []
        self.batch_sampler: Optional[FederatedBatchSampler] = None
        self.current: Optional[RoundState] = None
        self._round_blocks: dict[int, int] = {}
        self._participants: dict[int, list[int]] = {}
        self._active: Optional[_ActiveClient] = None
        self._last_module_optimizer: Optional[weakref.ref[Optimizer]] = None
        self._kept_optimizers: dict[tuple[int, int], Optimizer] = {}  # (client, block), with "per_block"
        self._user_trainable: Optional[set[str]] = None
        self._restored_pending: Optional[dict[int, dict[int, dict[str, Any]]]] = None
        self._saved_blocks: Optional[list[list[str]]] = None
        self._restored_optimizer_states: dict[tuple[int, int], dict[str, Any]] = {}
        self._restored_schedule: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ setup

    @property
    @override
    def root_device(self) -> torch.device:
        if self._device_given or not self.parallel_devices:
            return self._root_device
        if len(self.parallel_devices) > 1:
            raise MisconfigurationException(
                f"FederatedBlockStrategy runs every virtual client in one process on one device, but the Trainer"
                f" has devices={[str(d) for d in self.parallel_devices]}. Use `devices=1` (or one index, e.g."
                f" `devices=[1]`)."
            )
        return torch.device(self.parallel_devices[0])

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._validate_trainer(trainer)
            model = self.lightning_module
            self.partition = (
                partition_by_patterns(model, self.block_patterns)
                if self.block_patterns
                else partition_decoder(model, **self.block_options)
            )
            probe = GradientProbe(self) if self.schedule_kind == "gradient" else None
            self.schedule = BlockSchedule(self.schedule_kind, len(self.partition), self.seed, probe)
            if self._restored_schedule is not None:
                self.schedule.load_state_dict(self._restored_schedule)
                self._restored_schedule = None
            self._check_restored_blocks()
            self._user_trainable = {n for n, p in model.named_parameters() if p.requires_grad}

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
        if isinstance(trainer.precision_plugin, HalfPrecision):
            raise MisconfigurationException(
                f"`precision={trainer.precision!r}` keeps the trained block in half precision, where small updates"
                " round away; fp32 master copies of the active block are not implemented yet. Use"
                " `precision='bf16-mixed'` (or '16-mixed')."
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
        optimizers, schedulers = _init_optimizers_and_lr_schedulers(self.lightning_module)
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
        self.clients = self._make_clients(trainer, len(dataloader.dataset))
        small = [c.index for c in self.clients if c.num_samples < dataloader.batch_size]
        if small:
            rank_zero_warn(
                f"Clients {small} hold fewer examples than batch_size={dataloader.batch_size}; their batches repeat"
                " examples."
            )
        self.batch_sampler = FederatedBatchSampler(
            client_indices=[c.sample_indices for c in self.clients],
            batch_size=dataloader.batch_size,
            batches_per_turn=self.batches_per_turn,
            participants=self.participants_of,
            current_round=lambda: trainer.current_epoch,
            seed=self.seed,
            shuffle=self.shuffle,
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
        clients = [VirtualClient(index=i, sample_indices=list(shard)) for i, shard in enumerate(shards)]
        if self._restored_pending is not None:
            for client in clients:
                saved = self._restored_pending.get(client.index, {})
                client.pending = {r: BlockDelta(r, d["block"], d["tensors"]) for r, d in saved.items()}
            self._restored_pending = None
        else:
            for client, old in zip(clients, self.clients):
                client.pending = old.pending
        return clients

    @property
    def batches_per_turn(self) -> int:
        """Micro-batches a participant consumes per round: K optimizer steps × accumulation."""
        return self.local_steps * self.lightning_module.trainer.accumulate_grad_batches

    def is_last_batch_of_round(self, batch_idx: int) -> bool:
        assert self.batch_sampler is not None, "the train dataloader is not set up"
        return batch_idx + 1 == len(self.batch_sampler)

    # ----------------------------------------------------------------- rounds

    def participants_of(self, round_index: int) -> list[int]:
        if round_index not in self._participants:
            self._participants[round_index] = sample_participants(
                round_index, self.num_clients, self.clients_per_round, self.seed
            )
        return self._participants[round_index]

    def block_of(self, round_index: int) -> int:
        assert self.schedule is not None, "the strategy is not set up"
        if round_index not in self._round_blocks:
            self._round_blocks[round_index] = self.schedule.block_for_round(round_index)
        return self._round_blocks[round_index]

    def begin_round(self, round_index: int) -> RoundState:
        """Unfreeze the round's block; clients are entered as their batches arrive."""
        assert self.partition is not None and self.batch_sampler is not None, "the strategy is not set up"
        self.current = RoundState(round_index, self.block_of(round_index), self.participants_of(round_index))
        self.current.probe_seconds = self.schedule.probe_seconds.get(round_index, 0.0)
        self.partition.freeze_all_but(self.lightning_module, self.current.block, self._user_trainable)
        return self.current

    def finish_round(self) -> RoundState:
        """Close the last client's turn; the model holds the global values again."""
        assert self.current is not None, "no round in progress"
        self._leave_client()
        return self.current

    @property
    def round_open(self) -> bool:
        """A round has begun and its boundary is not applied yet: no consistent state to save."""
        return self.current is not None and not self.current.closed

    def abandon_turn(self) -> None:
        """Put the global values back without recording the client's delta (an exception interrupted it)."""
        self._leave_client(record=False)

    def round_deltas(self, round_index: int) -> dict[int, dict[str, Tensor]]:
        """Each client's own delta of ``round_index``, by client id."""
        return {c.index: c.pending[round_index].tensors for c in self.clients if round_index in c.pending}

    def round_weights(self, round_index: int) -> dict[int, float]:
        """Aggregation weights over the clients that sent a delta in ``round_index``."""
        senders = [c for c in self.clients if round_index in c.pending]
        return {c.index: w for c, w in zip(senders, aggregation_weights(senders, self.weighting))}

    def pending_rounds(self) -> list[int]:
        return sorted({r for c in self.clients for r in c.pending})

    @torch.no_grad()
    def apply_aggregate(
        self, round_index: int, block: int, aggregate: dict[str, Tensor], left_out: Sequence[int] = ()
    ) -> None:
        """The boundary for round ``round_index``: global += η Δ, and every client drops its own Δ^i.

        Dropping Δ^i is the correction η(Δ − Δ^i) in the invariant's terms: a client's view is the
        global model plus its pending deltas, so the view's block moves by η Δ − η Δ^i. Clients
        ``left_out`` of the aggregate (a non-finite delta) drop every pending delta: what they trained
        since was built on the bad state, and they restart from the global model.
        """
        assert self._active is None, "cannot aggregate while a client's view is loaded"
        params = self.partition.parameters(self.lightning_module, block)
        for name, delta in aggregate.items():
            param = params[name]
            param.copy_((param.float() + self.global_lr * delta.to(param.device)).to(param.dtype))
        for client in self.clients:
            if client.index in left_out:
                client.pending.clear()
            client.pending.pop(round_index, None)

    def client_view(self, client_index: int) -> dict[str, Tensor]:
        """The full model of one client (global plus its pending deltas), for tests and inspection."""
        assert self._active is None, "cannot materialize a view while another client's view is loaded"
        state = {n: p.detach().float().clone() for n, p in self.lightning_module.named_parameters()}
        return {**state, **self._view_values(self.clients[client_index], state)}

    def _view_values(self, client: VirtualClient, global_values: dict[str, Tensor]) -> dict[str, Tensor]:
        """global + η Σ own pending deltas, in fp32, for the parameters the client's deltas touch."""
        views: dict[str, Tensor] = {}
        for delta in sorted(client.pending.values(), key=lambda d: d.round):
            for name, tensor in delta.tensors.items():
                base = views.get(name, global_values[name].float())
                views[name] = base + self.global_lr * tensor.to(base.device)
        return views

    @property
    def active_client(self) -> Optional[int]:
        """The client whose view is loaded, or ``None`` between turns."""
        return None if self._active is None else self._active.client.index

    def client_state_nbytes(self) -> int:
        """Bytes all clients hold beyond the global model: pending deltas and kept optimizer state."""
        pending = sum(c.pending_nbytes() for c in self.clients)
        return pending + sum(optimizer_state_nbytes(o) for o in self._kept_optimizers.values())

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
        client = self.clients[self.current.participants[batch_idx // self.batch_sampler.batches_per_turn]]
        if self._active is None or self._active.client is not client:
            self._leave_client()
            self._enter_client(client)

    @override
    def on_validation_start(self) -> None:
        # Validation at a round's end evaluates the global model, not the last client's view.
        self._leave_client()

    @override
    def on_exception(self, exception: BaseException) -> None:
        self.abandon_turn()
        self._restore_user_trainable()

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
        _optimizers_to_device(list(self._kept_optimizers.values()), torch.device("cpu"))
        super().teardown()

    @torch.no_grad()
    def _enter_client(self, client: VirtualClient) -> None:
        """Load global + η Σ pending deltas into the touched blocks, and the client's optimizer."""
        assert self.current is not None and self.partition is not None
        model, block = self.lightning_module, self.current.block
        if self.current.index in client.pending:
            raise RuntimeError(
                f"Client {client.index} already finished its turn in round {self.current.index}; a turn cannot"
                " resume once its delta is recorded (was the round interrupted by a validation loop?)."
            )
        touched = {block} | {d.block for d in client.pending.values()}
        params = {n: p for b in touched for n, p in self.partition.parameters(model, b).items()}
        global_values = {name: p.detach().clone() for name, p in params.items()}
        for name, value in self._view_values(client, global_values).items():
            params[name].copy_(value.to(params[name].dtype))
        start_values = {n: p.detach().float().clone() for n, p in self.partition.parameters(model, block).items()}
        self._active = _ActiveClient(client, global_values, start_values, time.perf_counter())
        self.optimizers = [self._client_optimizer(client, block)]

    @torch.no_grad()
    def _leave_client(self, record: bool = True) -> None:
        """Record Δ^i_t and copy the exact global values back."""
        active, self._active = self._active, None
        if active is None:
            return
        assert self.current is not None and self.partition is not None
        model, block = self.lightning_module, self.current.block
        params = self.partition.parameters(model, block)
        if record:
            delta = {name: params[name].detach().float() - start for name, start in active.start_values.items()}
            if self.offload_deltas:
                delta = {name: tensor.cpu() for name, tensor in delta.items()}
            active.client.pending[self.current.index] = BlockDelta(self.current.index, block, delta)
        all_params = dict(model.named_parameters())
        for name, value in active.global_values.items():
            all_params[name].copy_(value)
        for param in params.values():
            param.grad = None
        self.optimizers = []  # checkpoints carry no stale client optimizer
        if self.root_device.type == "cuda":
            torch.cuda.synchronize(self.root_device)
        self.current.compute_seconds[active.client.index] = time.perf_counter() - active.started_at

    def _client_optimizer(self, client: VirtualClient, block: int) -> Optimizer:
        kept = self._kept_optimizers.get((client.index, block))
        if kept is not None:
            return kept
        if self.client_optimizer is not None:
            optimizer = self.client_optimizer(list(self.partition.parameters(self.lightning_module, block).values()))
        else:
            optimizer = self._optimizer_from_module()
        if self.optimizer_state_policy == "per_block":
            saved = self._restored_optimizer_states.pop((client.index, block), None)
            if saved is not None:
                optimizer.load_state_dict(saved)
            self._kept_optimizers[(client.index, block)] = optimizer
        return optimizer

    # ------------------------------------------------------------- checkpoints

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None) -> None:
        """Add every client's pending deltas and kept optimizer states: with the global weights, the federation."""
        if self.round_open:
            message = (
                f"A checkpoint was requested in the middle of round {self.current.index}, before its boundary;"
                " it could not be resumed. Save at round boundaries: `ModelCheckpoint(every_n_epochs=...)`."
            )
            if self.lightning_module.trainer.state.status == TrainerStatus.INTERRUPTED:
                rank_zero_warn(message + " Skipped while handling an exception.")
                return
            raise MisconfigurationException(message)
        checkpoint["federation"] = {
            "num_clients": self.num_clients,
            "blocks": [list(b.param_names) for b in self.partition.blocks] if self.partition else None,
            "pending": {
                c.index: {r: {"block": d.block, "tensors": d.tensors} for r, d in c.pending.items()}
                for c in self.clients
            },
            "schedule": self.schedule.state_dict() if self.schedule is not None else self._restored_schedule,
            "optimizers": {
                **self._restored_optimizer_states,  # restored but not used again yet
                **{key: optimizer.state_dict() for key, optimizer in self._kept_optimizers.items()},
            },
        }
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        """Client optimizers are built per turn; at a round boundary there is none to restore."""
        return False

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        federation = checkpoint.get("federation")
        if federation is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint  # validate/test from a checkpoint need the global weights only
        if federation["num_clients"] != self.num_clients:
            raise MisconfigurationException(
                f"The checkpoint {checkpoint_path} was written with num_clients={federation['num_clients']},"
                f" this run has num_clients={self.num_clients}."
            )
        self._saved_blocks = federation["blocks"]
        self._restored_pending = federation["pending"]
        self._restored_optimizer_states = dict(federation["optimizers"])
        self._restored_schedule = federation.get("schedule")
        return checkpoint


def _is_whole_epoch(value: Union[int, float]) -> bool:
    """``1.0`` (a float) means the whole epoch; the integer ``1`` means one batch."""
    return isinstance(value, float) and value == 1.0
