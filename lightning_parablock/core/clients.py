"""Virtual clients: what each one owns beyond the single shared global model.

By the invariant of ParaBlock (paper Eq. 3-4) a client's model is always the
global model plus its own not-yet-aggregated block deltas, so a client is a data
shard, those pending deltas and its optimizer state; never a model copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

from lightning_parablock.core.sizes import nbytes_of


@dataclass
class BlockDelta:
    """Δ^i_t: how far one client moved one block in one round, kept in fp32."""

    round: int
    block: int
    tensors: dict[str, Tensor]
    ready: Optional[Any] = None  # a CUDA event: the tensors are host copies still in flight until it completes

    def wait(self) -> "BlockDelta":
        """Block until the tensors' copy (if any is in flight) has landed; return self."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.tensors)


@dataclass
class VirtualClient:
    """A client of the simulated federation."""

    index: int
    sample_indices: list[int]
    pending: dict[int, BlockDelta] = field(default_factory=dict)  # round -> own delta, not yet aggregated

    @property
    def num_samples(self) -> int:
        return len(self.sample_indices)

    def pending_nbytes(self) -> int:
        return sum(delta.nbytes for delta in self.pending.values())
