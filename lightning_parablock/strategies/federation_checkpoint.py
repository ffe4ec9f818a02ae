"""The federation's part of a Lightning checkpoint: written at round boundaries, gathered from every rank,
checked and restored on resume.

Lightning saves the global model and the Trainer's progress; a federated run also needs every client's pending
deltas, error-feedback residuals and kept optimizer states, and what defines the federation (the number of
clients, their placement on ranks, the blocks, the schedule's past choices). With several processes each rank
holds only its own clients: their state is moved to the host and gathered on rank 0 over a CPU process group, so
no GPU ever stages world × state (NCCL object collectives would), and each rank loads its clients' share onto
its own device when it resumes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_parablock.core.blocks import BlockPartition
from lightning_parablock.core.federation import Federation
from lightning_parablock.core.schedule import BlockSchedule
from lightning_parablock.strategies.client_exchange import ClientExchange
from lightning_parablock.strategies.run_settings import RunSettings, check_same_settings

CHECKPOINT_KEY = "federation"
"""Where the federation's state sits in a Lightning checkpoint."""


def may_save(open_round: Optional[int], interrupted: bool) -> bool:
    """Whether a checkpoint may be saved now: between rounds only, since a round's middle could not be resumed.

    In a round (``open_round``) the save is refused, or skipped with a warning while an exception is handled
    (``ModelCheckpoint(save_on_exception=True)``): the last checkpoint at a boundary stands.
    """
    if open_round is None:
        return True
    message = (
        f"A checkpoint was requested in the middle of round {open_round}, before its boundary; it could not be"
        " resumed. Save at round boundaries: `ModelCheckpoint(every_n_epochs=...)`."
    )
    if interrupted:
        rank_zero_warn(message + " Skipped while handling an exception.")
        return False
    raise MisconfigurationException(message)


class FederationCheckpoint:
    """Writes the federation into checkpoints and holds a restored one until the strategy is set up.

    Lightning loads a checkpoint before the strategy's ``setup`` (the model, its blocks, the clients and the
    exchange do not exist yet); what it read is kept here, checked against the run once the strategy is set up
    (:meth:`check`), and applied piece by piece as the federation is built.
    """

    def __init__(self) -> None:
        self.restored: Optional[dict[str, Any]] = None
        self._path: Any = None
        self._gather_group: Optional[dist.ProcessGroup] = None

    def setup(self, distributed: bool) -> None:
        """With several processes, the CPU group checkpoints are gathered over; every rank must call it."""
        if distributed and self._gather_group is None:
            self._gather_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def entry(
        self,
        federation: Federation,
        exchange: ClientExchange,
        partition: BlockPartition,
        schedule: BlockSchedule,
        placement: list[int],
        world_size: int,
        settings: RunSettings,
    ) -> Optional[dict[str, Any]]:
        """The checkpoint's federation entry: every rank's clients, on rank 0 (``None`` on the other ranks)."""
        state = _to_host({**federation.state_dict(), **exchange.state_dict()})
        if world_size > 1:
            states: Optional[list[Optional[dict[str, Any]]]] = [None] * world_size if dist.get_rank() == 0 else None
            dist.gather_object(state, states, dst=0, group=self._gather_group)
            if states is None:
                return None
            state = {
                **state,
                "pending": {i: p for s in states for i, p in s["pending"].items()},
                "optimizers": {k: o for s in states for k, o in s["optimizers"].items()},
                "residuals": {i: r for s in states for i, r in s["residuals"].items()},
            }
        return {
            **state,
            "num_clients": len(placement),
            "blocks": [list(b.param_names) for b in partition.blocks],
            "world_size": world_size,
            "placement": list(placement),
            "schedule": schedule.state_dict(),
            "settings": dict(settings),
        }

    def read(self, entry: Optional[dict[str, Any]], checkpoint_path: Any) -> None:
        """Keep ``entry`` until :meth:`check` compares it with the run the strategy sets up.

        Without an entry (a checkpoint of plain Lightning or another tool) the clients' pending deltas would be
        lost silently: refused.
        """
        if entry is None:
            raise MisconfigurationException(
                f"The checkpoint {checkpoint_path} holds no federation state (no {CHECKPOINT_KEY!r} entry: written by"
                " plain Lightning or another tool?); resuming from it would lose every client's pending deltas."
                " Resume from a checkpoint a FederatedBlockStrategy saved at a round boundary, or start a new run from"
                " its weights: load them into the module (`load_state_dict(torch.load(path)['state_dict'])`) and fit"
                " without `ckpt_path`."
            )
        self.restored, self._path = entry, checkpoint_path

    def check(self, num_clients: int, world_size: int, placement: list[int], settings: RunSettings) -> None:
        """The restored checkpoint belongs to this run: clients, settings, processes and placement are the same.

        An entry written before a setting was recorded is compared on what it holds.
        """
        entry, path = self.restored, self._path
        if entry is None:
            return
        if entry["num_clients"] != num_clients:
            self.restored = None
            raise MisconfigurationException(
                f"The checkpoint {path} was written with num_clients={entry['num_clients']},"
                f" this run has num_clients={num_clients}."
            )
        try:
            check_same_settings(entry.get("settings", {}), settings, path)
        except MisconfigurationException:
            self.restored = None
            raise
        if entry.get("flushed"):
            rank_zero_warn(
                f"The checkpoint {path} holds the run's final global model, saved after its last rounds' pending"
                " deltas were exchanged (the flush). Training on from it is not the same as one longer run; to"
                " continue the run exactly, resume from the checkpoint of its last round (`last.ckpt`)."
            )
        saved_world = entry.get("world_size", 1)
        saved_placement = entry.get("placement", placement if saved_world == 1 else None)
        if saved_world != world_size or saved_placement != placement:
            self.restored = None
            raise MisconfigurationException(
                f"The checkpoint {path} was written by {saved_world} process(es) with clients placed on"
                f" {saved_placement}; this run has {world_size} process(es) placing them on {placement}. Resume"
                " with the same number of processes (devices × num_nodes), sites and seed."
            )

    def check_blocks(self, partition: BlockPartition) -> None:
        """The restored run partitioned the model into the same blocks."""
        if self.restored is None:
            return
        saved = self.restored["blocks"]
        current = [list(b.param_names) for b in partition.blocks]
        if saved != current:
            self.restored = None
            raise MisconfigurationException(
                f"The checkpoint was written with {len(saved)} blocks and this run partitions the model into"
                f" {len(current)} blocks{'' if len(saved) != len(current) else ' of other parameters'}; resume"
                " with the block options of the original run."
            )

    def restore_schedule(self, schedule: BlockSchedule) -> None:
        """The schedule's past choices (the gradient schedule cannot re-derive them)."""
        if self.restored is not None and self.restored.get("schedule") is not None:
            schedule.load_state_dict(self.restored["schedule"])

    def restore_into(self, federation: Federation, exchange: ClientExchange) -> None:
        """The hosted clients' pending deltas, residuals and optimizer states, once the clients exist."""
        if self.restored is not None:
            federation.load_state_dict(self.restored)
            exchange.load_state_dict(self.restored)
            self.restored = None


def _to_host(value: Any) -> Any:
    """``value`` with every tensor moved to the host, so gathering and pickling never touch a GPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_host(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(item) for item in value)
    return value
