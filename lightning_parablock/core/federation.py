"""The federation one process holds: its clients' state on top of one shared global model.

By the invariant of ParaBlock (paper Eq. 3-4) a client's model is always the global model plus its
own not-yet-aggregated block deltas, so a process hosting any number of clients keeps ONE model
(the global one) and, per client, only those pending deltas and, with ``optimizer_state="per_block"``,
its optimizer states. A client's *view* is loaded into the model for its turn and the exact global
values are copied back when it ends. Applying an aggregate moves the global model by η Δ and drops
every client's own Δ^i, which is the correction η(Δ − Δ^i) in the invariant's terms.

Nothing here knows about Lightning or about other processes: the single-device and the
distributed strategy share this class, and the transport decides how deltas meet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_parablock.core.blocks import BlockPartition
from lightning_parablock.core.clients import BlockDelta, VirtualClient
from lightning_parablock.core.device_copies import HostCopier
from lightning_parablock.core.master_weights import MasterBlock, needs_master
from lightning_parablock.core.sizes import optimizer_state_nbytes

OptimizerStatePolicy = Literal["reset", "per_block"]

#: Version of :meth:`Federation.state_dict`. 1: pending deltas and kept optimizer states of every client
#: (single process). 2: adds the rounds trained but not yet aggregated and the client placement on ranks.
#: 3: adds each client's error-feedback residual of compressed uploads (kept by the client exchange, saved beside).
STATE_SCHEMA_VERSION = 3


@dataclass
class _Turn:
    """The client whose view is loaded in the model right now."""

    client: VirtualClient
    round: int
    block: int
    global_values: dict[str, Tensor]  # exact global values of every parameter the view touches
    start_values: dict[str, Tensor]  # θ_0 of the round's block, fp32
    master: Optional[MasterBlock]  # fp32 masters of the block's half-precision weights


class Federation:
    """The clients one process hosts, their pending deltas, views and kept optimizers.

    Args:
        model: the module whose parameters are the global model.
        partition: the model's blocks.
        global_lr: η, the step along aggregated deltas.
        optimizer_state: ``"reset"`` builds a fresh optimizer every turn; ``"per_block"`` keeps one per
            (client, block).
        offload_deltas: keep pending deltas in host memory.
        new_optimizer: builds an optimizer over a block's parameters.
        master_weights: train bf16/fp16 weights of the active block through fp32 masters (see
            :mod:`~lightning_parablock.core.master_weights`); without them steps below half precision's resolution vanish.
    """

    def __init__(
        self,
        model: nn.Module,
        partition: BlockPartition,
        global_lr: float,
        optimizer_state: OptimizerStatePolicy,
        offload_deltas: bool,
        new_optimizer: Callable[[list[nn.Parameter]], Optimizer],
        master_weights: bool = True,
    ) -> None:
        self.model = model
        self.partition = partition
        self.global_lr = global_lr
        self.optimizer_state = optimizer_state
        self.offload_deltas = offload_deltas
        self._host_copies = HostCopier()
        self.new_optimizer = new_optimizer
        self.master_weights = master_weights
        self.clients: dict[int, VirtualClient] = {}  # hosted here, by client id
        self.unaggregated: dict[int, int] = {}  # round -> block, trained and not yet aggregated (every rank agrees)
        self.kept_optimizers: dict[tuple[int, int], Optimizer] = {}  # (client, block), with "per_block"
        self._saved_optimizer_states: dict[tuple[int, int], dict[str, Any]] = {}  # restored, not used yet
        self._turn: Optional[_Turn] = None

    # ------------------------------------------------------------------ clients

    def host(self, clients: Sequence[VirtualClient]) -> None:
        """Take ``clients`` as this process's own; pending deltas of clients hosted before carry over."""
        previous = self.clients
        self.clients = {c.index: c for c in clients}
        for index, client in self.clients.items():
            if index in previous:
                client.pending = previous[index].pending

    @property
    def active_client(self) -> Optional[int]:
        """The client whose view is loaded, or ``None`` between turns."""
        return None if self._turn is None else self._turn.client.index

    def round_trained(self, round_index: int, block: int) -> None:
        """Round ``round_index`` trained ``block``; it waits for its exchange."""
        self.unaggregated[round_index] = block

    def pending_rounds(self) -> list[int]:
        """Rounds trained and not yet aggregated, oldest first (the same on every process)."""
        return sorted(self.unaggregated)

    def round_deltas(self, round_index: int) -> dict[int, dict[str, Tensor]]:
        """Each hosted client's own delta of ``round_index``, by client id."""
        return {i: c.pending[round_index].wait().tensors for i, c in self.clients.items() if round_index in c.pending}

    def delta_of(self, client_index: int, round_index: int) -> Optional[dict[str, Tensor]]:
        """The pending delta ``client_index`` recorded in ``round_index`` (its tensors, changeable in place)."""
        delta = self.clients[client_index].pending.get(round_index)
        return None if delta is None else delta.wait().tensors

    def sample_counts(self, client_indices: Sequence[int]) -> dict[int, int]:
        return {i: self.clients[i].num_samples for i in client_indices}

    def client_state_nbytes(self) -> int:
        """Bytes the hosted clients hold beyond the global model: pending deltas and kept optimizer state (the
        client exchange holds compression residuals besides)."""
        pending = sum(c.pending_nbytes() for c in self.clients.values())
        return pending + sum(optimizer_state_nbytes(o) for o in self.kept_optimizers.values())

    # -------------------------------------------------------------------- turns

    @torch.no_grad()
    def start_turn(self, client_index: int, round_index: int, block: int) -> Optimizer:
        """Load global + η Σ pending deltas into the blocks the client touches; return its optimizer."""
        assert self._turn is None, "another client's view is loaded"
        client = self.clients[client_index]
        if round_index in client.pending:
            raise RuntimeError(
                f"Client {client.index} already finished its turn in round {round_index}; a turn cannot resume"
                " once its delta is recorded (was the round interrupted by a validation loop?)."
            )
        touched = {block} | {d.block for d in client.pending.values()}
        params = {n: p for b in touched for n, p in self.partition.parameters(self.model, b).items()}
        global_values = {name: p.detach().clone() for name, p in params.items()}
        views = self._view_values(client, global_values)
        for name, value in views.items():
            params[name].copy_(value.to(params[name].dtype))
        block_params = self.partition.parameters(self.model, block)
        half = {n: p for n, p in block_params.items() if needs_master(p)} if self.master_weights else {}
        start_values = {n: self._start_value(n, p, views, global_values, n in half) for n, p in block_params.items()}
        optimizer = self._optimizer(client.index, block)
        master = MasterBlock(half, start_values, optimizer) if half else None
        saved = self._saved_optimizer_states.pop((client.index, block), None)
        if saved is not None:  # after the masters are bound: loading casts the state to its parameters' dtype
            optimizer.load_state_dict(saved)
        self._turn = _Turn(client, round_index, block, global_values, start_values, master)
        return optimizer

    @staticmethod
    def _start_value(
        name: str, param: Tensor, views: dict[str, Tensor], global_values: dict[str, Tensor], mastered: bool
    ) -> Tensor:
        """θ_0 of one parameter in fp32, sharing a tensor the turn already holds where that is exact.

        A master starts from the exact fp32 view; half-precision weights trained in place start from their
        rounded values; without pending deltas on it, θ_0 is the (unchanging) global copy.
        """
        if name not in views:
            return global_values[name].to(torch.float32)
        if mastered or param.dtype == torch.float32:
            return views[name]
        return param.detach().to(torch.float32, copy=True)

    @torch.no_grad()
    def end_turn(self, record: bool = True) -> Optional[int]:
        """End the turn: keep Δ^i_t (unless ``record`` is false) and copy the exact global values back.

        Returns the client whose turn ended, or ``None`` when no view was loaded.
        """
        turn, self._turn = self._turn, None
        if turn is None:
            return None
        params = self.partition.parameters(self.model, turn.block)
        masters = {} if turn.master is None else turn.master.masters
        if turn.master is not None:
            turn.master.release()
        if record:
            current = {name: masters.get(name, param) for name, param in params.items()}
            delta = {name: current[name].detach().float() - start for name, start in turn.start_values.items()}
            ready = None
            if self.offload_deltas:  # pinned, non-blocking: the next client's turn does not wait for the copy
                delta, ready = self._host_copies.copy(delta)
            turn.client.pending[turn.round] = BlockDelta(turn.round, turn.block, delta, ready)
        all_params = dict(self.model.named_parameters())
        for name, value in turn.global_values.items():
            all_params[name].copy_(value)
        for param in params.values():
            param.grad = None
        return turn.client.index

    def _optimizer(self, client_index: int, block: int) -> Optimizer:
        kept = self.kept_optimizers.get((client_index, block))
        if kept is not None:
            return kept
        optimizer = self.new_optimizer(list(self.partition.parameters(self.model, block).values()))
        if self.optimizer_state == "per_block":
            self.kept_optimizers[(client_index, block)] = optimizer
        return optimizer

    # ------------------------------------------------------------------- views

    def client_view(self, client_index: int) -> dict[str, Tensor]:
        """The full model of one hosted client (global plus its pending deltas), in fp32."""
        assert self._turn is None, "cannot materialize a view while another client's view is loaded"
        state = {n: p.detach().float().clone() for n, p in self.model.named_parameters()}
        return {**state, **self._view_values(self.clients[client_index], state)}

    def _view_values(self, client: VirtualClient, global_values: dict[str, Tensor]) -> dict[str, Tensor]:
        """global + η Σ own pending deltas, in fp32, for the parameters the client's deltas touch."""
        views: dict[str, Tensor] = {}
        for delta in sorted(client.pending.values(), key=lambda d: d.round):
            for name, tensor in delta.wait().tensors.items():
                base = views.get(name, global_values[name].float())
                # non-blocking: an offloaded delta is pinned, and its upload queues behind the compute stream
                views[name] = base + self.global_lr * tensor.to(base.device, non_blocking=True)
        return views

    # -------------------------------------------------------------- aggregates

    @torch.no_grad()
    def apply_aggregate(
        self, round_index: int, aggregate: Optional[dict[str, Tensor]], left_out: Sequence[int] = ()
    ) -> None:
        """The boundary for round ``round_index``: global += η Δ, and every client drops its own Δ^i.

        Clients ``left_out`` of the aggregate (a non-finite delta) drop every pending delta: what they
        trained since was built on the bad state, and they restart from the global model. ``aggregate``
        is ``None`` when no client of the round was left to aggregate.
        """
        assert self._turn is None, "cannot aggregate while a client's view is loaded"
        block = self.unaggregated.pop(round_index)
        if aggregate is not None:
            params = self.partition.parameters(self.model, block)
            for name, delta in aggregate.items():
                param = params[name]
                upload = delta.to(param.device, non_blocking=True)  # a pinned aggregate does not block the host
                param.copy_((param.float() + self.global_lr * upload).to(param.dtype))
        for client in self.clients.values():
            if client.index in left_out:
                client.pending.clear()
            client.pending.pop(round_index, None)

    # ------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything the hosted clients own, plus the rounds waiting for their exchange."""
        return {
            "version": STATE_SCHEMA_VERSION,
            "unaggregated": dict(self.unaggregated),
            "pending": {
                i: {r: {"block": d.block, "tensors": d.wait().tensors} for r, d in c.pending.items()}
                for i, c in self.clients.items()
            },
            "optimizers": {
                **self._saved_optimizer_states,
                **{key: optimizer.state_dict() for key, optimizer in self.kept_optimizers.items()},
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the hosted clients' state from :meth:`state_dict` (of this or of every process)."""
        version = state.get("version", 1)
        if version > STATE_SCHEMA_VERSION:
            raise ValueError(
                f"The checkpoint's federation state has schema version {version}; this lightning_parablock reads"
                f" versions up to {STATE_SCHEMA_VERSION}. Upgrade lightning_parablock to resume it."
            )
        pending = state["pending"]
        home = torch.device("cpu") if self.offload_deltas else next(self.model.parameters()).device
        for index, client in self.clients.items():
            saved = pending.get(index, {})
            client.pending = {
                r: BlockDelta(r, d["block"], {n: t.to(home, torch.float32) for n, t in d["tensors"].items()})
                for r, d in saved.items()
            }
        if "unaggregated" in state:
            self.unaggregated = {int(r): int(b) for r, b in state["unaggregated"].items()}
        else:  # version 1: one process held every client, so its pending deltas name every open round
            self.unaggregated = {r: d["block"] for saved in pending.values() for r, d in saved.items()}
        self.kept_optimizers = {}
        self._saved_optimizer_states = {
            key: value for key, value in state["optimizers"].items() if key[0] in self.clients
        }
