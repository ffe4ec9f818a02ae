"""Round planning: who takes part in a round, in which turns, on which rank."""

from __future__ import annotations

import torch

from lightning_parablock.core.rng import Stream, stream_generator


def place_clients(num_clients: int, world_size: int, seed: int) -> list[int]:
    """The rank hosting each client: a seeded permutation dealt round-robin, so shares differ by at most one."""
    order = torch.randperm(num_clients, generator=stream_generator(seed, Stream.PLACEMENT)).tolist()
    placement = [0] * num_clients
    for position, client in enumerate(order):
        placement[client] = position % world_size
    return placement


def participants_per_round(num_clients: int, participation: float, clients_per_round: int | None) -> int:
    """How many clients train each round, from a fraction or an explicit count."""
    if clients_per_round is not None:
        if not 1 <= clients_per_round <= num_clients:
            raise ValueError(
                f"`clients_per_round` must be between 1 and num_clients={num_clients}, got {clients_per_round}."
            )
        return clients_per_round
    if not 0.0 < participation <= 1.0:
        raise ValueError(f"`participation` is the fraction of clients per round and must be in (0, 1], got {participation}.")
    return max(1, int(participation * num_clients + 0.5))  # halves round up: 0.25 of 10 clients is 3


def sample_participants(round_index: int, num_clients: int, count: int, seed: int) -> list[int]:
    """The clients of round ``round_index``: all of them, or ``count`` drawn without replacement (seeded)."""
    if count >= num_clients:
        return list(range(num_clients))
    generator = stream_generator(seed, Stream.PARTICIPANTS, round_index)
    return sorted(torch.randperm(num_clients, generator=generator)[:count].tolist())
