"""The order in which a round's batches reach the training loop.

One epoch of the Lightning loop is one federated round: the batch sampler yields
every participant's ``local_steps × accumulate`` batches, client after client.
Everything is a pure function of the seed and the round, so a resumed run draws
the same batches without saved RNG state, and a reference loop can ask for the
same plan.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import torch
from torch.utils.data import Sampler

from lightning_parablock.core.rng import Stream, stream_generator


@dataclass(frozen=True)
class ClientTurn:
    """One participant's share of a round: its batches of dataset indices, in order."""

    client: Optional[int]  # None: an idle turn, while another rank trains one more client than this one
    batches: tuple[tuple[int, ...], ...]


class FederatedBatchSampler(Sampler[list[int]]):
    """Yields dataset-index batches for the round that ``current_round()`` names.

    Each client reads its shard as an endless stream of seeded permutations and
    picks up in round ``t`` where its previous round left off.

    Args:
        client_indices: dataset indices of each client's shard.
        batch_size: samples per micro-batch.
        batches_per_turn: micro-batches per participant per round (local steps × accumulation).
        participants: the sorted client ids of a round that this process trains.
        current_round: the round to yield when iterated; read at ``iter()`` time because
            Lightning calls ``iter()`` before any epoch hook on resume.
        seed: seeds the shard permutations.
        shuffle: read each shard in a fresh seeded permutation per pass (else in the given order).
        turns_per_round: turns every process runs in a round (several processes must run the same
            number of batches); turns beyond this process's participants are idle. By default its
            participants' count.
        max_turns_per_round: the most turns of any round, for ``len()``; by default round 0's.
    """

    def __init__(
        self,
        client_indices: Sequence[Sequence[int]],
        batch_size: int,
        batches_per_turn: int,
        participants: Callable[[int], list[int]],
        current_round: Callable[[], int],
        seed: int = 0,
        shuffle: bool = True,
        turns_per_round: Optional[Callable[[int], int]] = None,
        max_turns_per_round: Optional[int] = None,
    ) -> None:
        for client, indices in enumerate(client_indices):
            if len(indices) == 0:
                raise ValueError(f"Client {client} has an empty data shard; every client needs at least one sample.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        self.client_indices = [list(indices) for indices in client_indices]
        self.batch_size = batch_size
        self.batches_per_turn = batches_per_turn
        self.participants = participants
        self.current_round = current_round
        self.seed = seed
        self.shuffle = shuffle
        self.turns_per_round = turns_per_round or (lambda r: len(self.participants(r)))
        self.max_turns_per_round = max_turns_per_round

    def __len__(self) -> int:
        """Batches of the longest round: Lightning reads it once; a shorter round ends when its plan does."""
        turns = self.max_turns_per_round if self.max_turns_per_round is not None else self.turns_per_round(0)
        return turns * self.batches_per_turn

    def __iter__(self) -> Iterator[list[int]]:
        for turn in self.plan(self.current_round()):
            for batch in turn.batches:
                yield list(batch)

    def plan(self, round_index: int) -> list[ClientTurn]:
        """Every participant's batches for ``round_index``, in the order they are trained."""
        turns = [ClientTurn(client, self.turn_batches(client, round_index)) for client in self.participants(round_index)]
        idle = ClientTurn(client=None, batches=(self._idle_batch(),) * self.batches_per_turn)
        return turns + [idle] * (self.turns_per_round(round_index) - len(turns))

    def turn_batches(self, client: int, round_index: int) -> tuple[tuple[int, ...], ...]:
        """The batches ``client`` trains in ``round_index`` (its stream picks up where its last turn ended)."""
        first = self._turns_before(client, round_index) * self.batches_per_turn
        return tuple(self._client_batch(client, first + k) for k in range(self.batches_per_turn))

    def _idle_batch(self) -> tuple[int, ...]:
        """Any valid batch: an idle turn's batches are loaded but never trained on."""
        first = next(indices[0] for indices in self.client_indices)
        return (first,) * self.batch_size

    def _turns_before(self, client: int, round_index: int) -> int:
        """Rounds before ``round_index`` in which ``client`` trained: where its data stream resumes."""
        return sum(client in self.participants(r) for r in range(round_index))

    def _client_batch(self, client: int, batch_number: int) -> tuple[int, ...]:
        shard = self.client_indices[client]
        start = batch_number * self.batch_size
        return tuple(self._stream_item(client, shard, position) for position in range(start, start + self.batch_size))

    def _stream_item(self, client: int, shard: list[int], position: int) -> int:
        epoch, offset = divmod(position, len(shard))
        if not self.shuffle:
            return shard[offset]
        return shard[int(self._permutation(client, len(shard), epoch)[offset])]

    @staticmethod
    @lru_cache(maxsize=256)
    def _cached_permutation(seed: int, client: int, size: int, epoch: int) -> torch.Tensor:
        return torch.randperm(size, generator=stream_generator(seed, Stream.DATA_ORDER, client, epoch))

    def _permutation(self, client: int, size: int, epoch: int) -> torch.Tensor:
        return self._cached_permutation(self.seed, client, size, epoch)
