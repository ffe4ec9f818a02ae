"""The default transport choice: the processes of the job are the members, in memory or by collectives."""

from __future__ import annotations

from lightning_parablock.comm.distributed import CollectiveTransport, new_exchange_group
from lightning_parablock.comm.in_memory import InMemoryTransport
from lightning_parablock.comm.transport import ExchangeContext, Transport, TransportChoice


class ByProcesses(TransportChoice):
    """In memory when one process hosts every client; torch.distributed collectives between several processes."""

    def build(self, context: ExchangeContext) -> Transport:
        if context.members == 1:
            return InMemoryTransport(context.aggregator, context.link)
        return CollectiveTransport(
            new_exchange_group(context.timeout_s),
            context.aggregator,
            context.link,
            context.placement,
            context.block_layout,
            context.timeout_s,
            pin_memory=context.device.type == "cuda",
        )
