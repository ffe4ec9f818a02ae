"""FedCyBGD: cyclic block gradient descent (Wang et al., 2024; github.com/L3030/FedCyBGD).

Clients train one after another, each its assigned block, on the model the previous one
left: client ``c`` always trains block ``c mod B`` (the reference's "ascending" mode). One
round here is one client's turn, so a cycle over N clients is N rounds. Before its turn a
client fetches the blocks that changed since its previous turn (the periodic
synchronization; the reference implementation re-sends every block updated so far, which
is the same once a cycle has passed); that fetch is counted in the timeline as the
client's ``sync_download_bytes``. After its turn it uploads its block's delta, which the
server applies as it is (the exchange's aggregate of one client, also downloaded back).
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.core.planning import CyclicPlan
from lightning_parablock.core.sizes import nbytes_of
from lightning_parablock.strategies.federated_block import FederatedBlockStrategy
from lightning_parablock.strategies.turns import RoundState


class FedCyBGDStrategy(FederatedBlockStrategy):
    """:class:`FederatedBlockStrategy` with FedCyBGD's cycle: one client per round, its own block.

    Use with ``ParaBlockCallback(staleness=0)`` and ``max_epochs`` = cycles × ``num_clients``
    (``Method.rounds``); a recipe's ``method: fedcybgd`` states cycles and the CLI converts them.
    ``schedule``, ``participation`` and ``clients_per_round`` do not apply: a value other than the default
    is refused.
    """

    plan_class = CyclicPlan

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        signature = inspect.signature(FederatedBlockStrategy.__init__)
        given = signature.bind(self, *args, **kwargs).arguments
        for name in ("schedule", "participation", "clients_per_round"):
            default = signature.parameters[name].default
            if name in given and given[name] != default:
                raise ValueError(
                    f"FedCyBGD trains one client per round, on block `client mod B`: `{name}` does not apply;"
                    f" leave it at its default {default!r}, got {given[name]!r}."
                )
        super().__init__(*args, **kwargs)

    @override
    def check_exchange(self, staleness: int, aggregator: Aggregator) -> None:
        if staleness != 0:
            raise MisconfigurationException(
                f"FedCyBGD passes the model from client to client: use `ParaBlockCallback(staleness=0)`,"
                f" got staleness={staleness}."
            )

    @override
    def start_round(self, round_index: int) -> RoundState:
        state = super().start_round(round_index)
        client = state.participants[0]
        first = max(0, round_index - self.options.num_clients + 1)
        changed = {self.plan.block_of(r) for r in range(first, round_index)}
        state.sync_download_bytes = {client: sum(self.block_nbytes(b) for b in changed)}
        return state

    def block_nbytes(self, block: int) -> int:
        """Bytes of a block's parameters as the model stores them."""
        params = self.partition.parameters(self.lightning_module, block).values()
        return nbytes_of(params)
