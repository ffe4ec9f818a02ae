"""Round planning: who takes part in a round, on which rank each client lives, and each rank's turns."""

from __future__ import annotations

from typing import Optional

import torch

from lightning_parablock.core.rng import Stream, stream_generator
from lightning_parablock.core.schedule import BlockSchedule


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


class RoundPlan:
    """Who trains which block in each round, and in which of this rank's turns.

    Everything here is a pure function of the seed, the round and the placement, so every rank (and a resumed
    run) computes the same plan without talking to the others. A rank hosting fewer of a round's participants
    than another pads its turns with idle ones (``None``), so that every rank runs the same number of batches.

    Args:
        num_clients: clients in the federation.
        clients_per_round: participants per round (all clients, or a seeded sample of this many).
        seed: seeds the participants and the placement.
        schedule: the block of each round.
        placement: the rank hosting each client (:func:`place_clients`).
        world_size: processes the clients are placed on.
        rank: this process.
    """

    def __init__(
        self,
        num_clients: int,
        clients_per_round: int,
        seed: int,
        schedule: BlockSchedule,
        placement: list[int],
        world_size: int,
        rank: int,
    ) -> None:
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.schedule = schedule
        self.placement = placement
        self.world_size = world_size
        self.rank = rank
        self._participants: dict[int, list[int]] = {}
        self._blocks: dict[int, int] = {}

    def participants_of(self, round_index: int) -> list[int]:
        """Every participant of ``round_index``, on any rank (the same list on every rank)."""
        if round_index not in self._participants:
            self._participants[round_index] = sample_participants(
                round_index, self.num_clients, self.clients_per_round, self.seed
            )
        return self._participants[round_index]

    def block_of(self, round_index: int) -> int:
        """The block every participant of ``round_index`` trains (asked once per round: a probe may run)."""
        if round_index not in self._blocks:
            self._blocks[round_index] = self.schedule.block_for_round(round_index)
        return self._blocks[round_index]

    def hosts(self, client: int) -> bool:
        return self.placement[client] == self.rank

    def hosted_participants(self, round_index: int) -> list[int]:
        """This rank's participants of ``round_index``, in turn order."""
        return [c for c in self.participants_of(round_index) if self.hosts(c)]

    def turns_per_round(self, round_index: int) -> int:
        """Turns every rank runs in ``round_index``: the most participants any one rank hosts."""
        per_rank = [0] * self.world_size
        for client in self.participants_of(round_index):
            per_rank[self.placement[client]] += 1
        return max(per_rank)

    def turns_of(self, round_index: int) -> list[Optional[int]]:
        """The client of each of this rank's turns in ``round_index``; ``None``: idle while other ranks train."""
        hosted = self.hosted_participants(round_index)
        return [*hosted, *[None] * (self.turns_per_round(round_index) - len(hosted))]

    def max_turns_per_round(self) -> int:
        """An upper bound on any round's turns, for sizing the epoch's batches."""
        hosted_most = max(self.placement.count(rank) for rank in range(self.world_size))
        return min(self.clients_per_round, hosted_most)


def cyclic_turn(round_index: int, num_clients: int, num_blocks: int) -> tuple[int, int]:
    """(client, block) of a FedCyBGD round: clients in order 0, 1, ..., N-1, 0, ...; client c trains block c mod B."""
    client = round_index % num_clients
    return client, client % num_blocks


class CyclicPlan(RoundPlan):
    """FedCyBGD's cycle: one client per round, in order, each on its own block (``client mod B``)."""

    def participants_of(self, round_index: int) -> list[int]:
        return [round_index % self.num_clients]

    def block_of(self, round_index: int) -> int:
        return cyclic_turn(round_index, self.num_clients, self.schedule.num_blocks)[1]
