"""Each client's share of the training set, and the training DataLoader that serves it round by round.

The datamodule may split the data itself (``client_partition(num_clients)``, e.g. Dirichlet by label); otherwise
the examples are dealt out iid, seeded. The user's DataLoader keeps its dataset, collate function and workers; only
its sampler is replaced by the :class:`~lightning_parablock.core.sampler.FederatedBatchSampler`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, IterableDataset

from lightning_parablock.core.clients import VirtualClient
from lightning_parablock.core.planning import RoundPlan
from lightning_parablock.core.sampler import FederatedBatchSampler


def check_train_loader(dataloader: object) -> DataLoader:
    """The training DataLoader must be a map-style torch DataLoader with a batch size."""
    if not isinstance(dataloader, DataLoader) or isinstance(dataloader.dataset, IterableDataset):
        raise MisconfigurationException(
            f"FederatedBlockStrategy splits a map-style dataset among clients; the train dataloader must be a"
            f" torch DataLoader over a map-style dataset, got {type(dataloader).__name__}."
        )
    if dataloader.batch_size is None:
        raise MisconfigurationException(
            "The train DataLoader has no `batch_size` (a custom batch_sampler?); give it a batch_size."
        )
    return dataloader


def make_clients(datamodule: Any, num_examples: int, num_clients: int, seed: int) -> list[VirtualClient]:
    """Client shards from the datamodule's ``client_partition(num_clients)``, else an iid split."""
    if datamodule is not None and hasattr(datamodule, "client_partition"):
        shards = datamodule.client_partition(num_clients)
        if len(shards) != num_clients:
            raise MisconfigurationException(
                f"`{type(datamodule).__name__}.client_partition` returned {len(shards)} shards for"
                f" num_clients={num_clients}."
            )
    else:
        if num_examples < num_clients:
            raise MisconfigurationException(
                f"The training set has {num_examples} examples, fewer than num_clients={num_clients}."
            )
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
        shards = [order[i::num_clients] for i in range(num_clients)]
    for index, shard in enumerate(shards):
        if len(shard) == 0:
            raise MisconfigurationException(f"Client {index} has no training examples; every client needs some.")
    return [VirtualClient(index=i, sample_indices=list(shard)) for i, shard in enumerate(shards)]


def client_batch_sampler(
    clients: list[VirtualClient],
    batch_size: int,
    plan: RoundPlan,
    batches_per_turn: int,
    current_round: Callable[[], int],
    seed: int,
    shuffle: bool,
) -> FederatedBatchSampler:
    """The batches of every hosted participant's turn, round by round; warns about clients smaller than a batch."""
    small = [c.index for c in clients if c.num_samples < batch_size]
    if small:
        rank_zero_warn(
            f"Clients {small} hold fewer examples than batch_size={batch_size}; their batches repeat examples."
        )
    return FederatedBatchSampler(
        client_indices=[c.sample_indices for c in clients],
        batch_size=batch_size,
        batches_per_turn=batches_per_turn,
        participants=plan.hosted_participants,
        current_round=current_round,
        seed=seed,
        shuffle=shuffle,
        turns_per_round=plan.turns_per_round,
        max_turns_per_round=plan.max_turns_per_round(),
    )


def federated_loader(dataloader: DataLoader, batch_sampler: FederatedBatchSampler) -> DataLoader:
    """``dataloader`` with its batches drawn by ``batch_sampler``; everything else as the user set it."""
    extra = {}
    if dataloader.num_workers > 0:
        extra = dict(prefetch_factor=dataloader.prefetch_factor, persistent_workers=dataloader.persistent_workers)
    return DataLoader(
        dataloader.dataset,
        batch_sampler=batch_sampler,
        num_workers=dataloader.num_workers,
        collate_fn=dataloader.collate_fn,
        pin_memory=dataloader.pin_memory,
        timeout=dataloader.timeout,
        worker_init_fn=dataloader.worker_init_fn,
        multiprocessing_context=dataloader.multiprocessing_context,
        **extra,
    )
