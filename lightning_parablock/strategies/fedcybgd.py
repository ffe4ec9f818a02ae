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

import dataclasses

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_parablock.core.planning import CyclicPlan, RoundPlan
from lightning_parablock.core.schedule import BlockSchedule
from lightning_parablock.core.sizes import nbytes_of
from lightning_parablock.strategies.exchange_spec import ExchangeSpec
from lightning_parablock.strategies.federated_block import FederatedBlockStrategy
from lightning_parablock.strategies.federation_options import FederationOptions


class FedCyBGDStrategy(FederatedBlockStrategy):
    """:class:`FederatedBlockStrategy` with FedCyBGD's cycle: one client per round, its own block.

    Use with ``ParaBlockCallback(staleness=0)`` and ``max_epochs`` = cycles × ``num_clients``
    (``Method.rounds``); a recipe's ``method: fedcybgd`` states cycles and the CLI converts them.
    ``schedule``, ``participation`` and ``clients_per_round`` do not apply: a value other than the default
    is refused.
    """

    _NOT_APPLICABLE = ("schedule", "participation", "clients_per_round")

    @override
    def check_options(self, options: FederationOptions) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(FederationOptions)}
        for name in self._NOT_APPLICABLE:
            given = getattr(options, name)
            if given != defaults[name]:
                raise ValueError(
                    f"FedCyBGD trains one client per round, on block `client mod B`: `{name}` does not apply;"
                    f" leave it at its default {defaults[name]!r}, got {given!r}."
                )

    @property
    @override
    def participants_per_round(self) -> int:
        return 1

    @override
    def check_exchange(self, spec: ExchangeSpec) -> None:
        if spec.staleness != 0:
            raise MisconfigurationException(
                f"FedCyBGD passes the model from client to client: use `ParaBlockCallback(staleness=0)`,"
                f" got staleness={spec.staleness}."
            )

    @override
    def make_round_plan(self, schedule: BlockSchedule, member: int, members: int) -> RoundPlan:
        options = self.options
        return CyclicPlan(
            options.num_clients, options.participants_per_round, options.seed, schedule, self.placement, members, member
        )

    @override
    def round_sync_downloads(self, round_index: int) -> dict[int, int]:
        """Before its turn, the round's client fetches every block changed since its previous turn."""
        client = self.plan.participants_of(round_index)[0]
        first = max(0, round_index - self.options.num_clients + 1)
        changed = {self.plan.block_of(r) for r in range(first, round_index)}
        return {client: sum(self.block_nbytes(b) for b in changed)}

    def block_nbytes(self, block: int) -> int:
        """Bytes of a block's parameters as the model stores them."""
        params = self.partition.parameters(self.lightning_module, block).values()
        return nbytes_of(params)
