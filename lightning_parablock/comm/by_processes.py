"""The default transport choice: the processes of the job are the members, in memory or by collectives."""

from __future__ import annotations

from lightning_parablock.comm.distributed import CollectiveTransport, new_exchange_group
from lightning_parablock.comm.in_memory import InMemoryTransport
from lightning_parablock.comm.shared_memory import SharedMemorySum
from lightning_parablock.comm.transport import ExchangeContext, Transport, TransportChoice


class ByProcesses(TransportChoice):
    """In memory when one process hosts every client; torch.distributed collectives between several processes.

    Args:
        shared_memory: between processes that all run on one machine (the same ``/dev/shm`` and network
            namespace), add up the partial sums in shared memory rather than by gloo's all-reduce over TCP,
            which copies each byte through the kernel (about 1 CPU second per rank and round at a Llama 3-8B
            block). Same values; ``False`` keeps gloo (across machines it is always gloo).
    """

    def __init__(self, shared_memory: bool = True) -> None:
        if not isinstance(shared_memory, bool):
            raise TypeError(f"ByProcesses(shared_memory=...) takes True or False, got {shared_memory!r}.")
        self.shared_memory = shared_memory

    def build(self, context: ExchangeContext) -> Transport:
        if context.members == 1:
            return InMemoryTransport(context.aggregator, context.link)
        group = new_exchange_group(context.timeout_s)
        return CollectiveTransport(
            group,
            context.aggregator,
            context.link,
            context.placement,
            context.block_layout,
            context.timeout_s,
            pin_memory=context.device.type == "cuda",
            shared=SharedMemorySum.between(group) if self.shared_memory else None,
        )

    def __repr__(self) -> str:
        return "ByProcesses()" if self.shared_memory else "ByProcesses(shared_memory=False)"
