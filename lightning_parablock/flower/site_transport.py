"""A site's transport: its clients' deltas go to the Flower server through the mailbox, the aggregate comes back.

It runs on the communication thread like every transport: it posts the round's uploads (encoded as the codec made
them) for the next ClientApp to take, then waits for the server's delivery of the round's aggregate, which comes
with the next round's request, or with the final message. Compute goes on meanwhile: this is where ParaBlock hides
Flower's latency behind the next round's training. What it measures (when the uploads were ready, when the
aggregate arrived) travels with the next uploads to the server, which writes the federation's timeline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Optional

from torch import Tensor

from lightning_parablock.comm.codecs import as_encoded
from lightning_parablock.comm.transport import ExchangeResult, RoundUploads
from lightning_parablock.core.sizes import nbytes_of
from lightning_parablock.flower.app.parablock_app.wire import WireError, wall_clock
from lightning_parablock.flower.arrays import BlockLayout, aggregate_from_wire, uploads_to_wire
from lightning_parablock.flower.site_mailbox import SiteMailbox

Telemetry = Callable[[], dict[str, Any]]
"""What else goes up with each upload: the site's round records and round times not sent yet."""


class FlowerSiteTransport:
    """Exchanges this site's hosted clients' deltas through the Flower server (see the module's docstring); a
    :class:`~lightning_parablock.comm.transport.Transport`.

    Args:
        mailbox: the site's mailbox.
        layout: the names and shapes of a block's parameters.
        codec_name: the codec every upload is encoded with (checked per tensor; the server decodes by it).
        telemetry: extra measurements to send with each upload.
    """

    def __init__(
        self, mailbox: SiteMailbox, layout: Callable[[int], BlockLayout], codec_name: str, telemetry: Telemetry
    ) -> None:
        self.mailbox = mailbox
        self.layout = layout
        self.codec_name = codec_name
        self.telemetry = telemetry
        self._deliveries: list[dict[str, Any]] = []  # when each aggregate arrived: sent with the next upload

    def exchange(self, uploads: RoundUploads, stop: threading.Event) -> ExchangeResult:
        """Post ``uploads``, wait for the round's aggregate; return early (no aggregate) once ``stop`` is set."""
        started = time.perf_counter()
        round_index, block = uploads.round, uploads.block
        encoded = {client: as_encoded(delta) for client, delta in uploads.deltas.items()}
        for client, delta in encoded.items():
            for name, tensor in delta.items():
                if tensor.codec.name != self.codec_name:
                    raise ValueError(
                        f"client {client}'s {name!r} is encoded with {tensor.codec!r}, the run with {self.codec_name!r}"
                    )
        arrays = uploads_to_wire(encoded)
        ready_at = wall_clock()
        header = {
            "round": round_index,
            "block": block,
            "site": self.mailbox.site,
            "codec": self.codec_name,
            "weights": {str(client): float(uploads.weights[client]) for client in sorted(encoded)},
            "ready_at": ready_at,
            "deliveries": self._deliveries,
            **self.telemetry(),
        }
        self._deliveries = []
        self.mailbox.post_uploads(round_index, header, arrays)
        work = time.perf_counter() - started
        delivery = self.mailbox.wait_aggregate(round_index, stop=stop)
        if delivery is None:  # shutting down: nobody collects this exchange
            return ExchangeResult(round_index, block, None, [], {}, 0, 0.0, work)
        decoding = time.perf_counter()
        meta = delivery.header.get("aggregate") or {}
        where = f"the aggregate of round {round_index} for site {self.mailbox.site}"
        if meta.get("block") != block:
            raise WireError(f"{where} is for block {meta.get('block')!r}, this site trained block {block}")
        aggregate: Optional[dict[str, Tensor]] = None
        if meta.get("kept", True):
            aggregate = aggregate_from_wire(delivery.arrays, self.layout(block), where)
        self._deliveries.append(
            {
                "round": round_index,
                "received_at": delivery.received_at,
                "mailbox_started_at": delivery.mailbox_started_at,
            }
        )
        return ExchangeResult(
            round=round_index,
            block=block,
            aggregate=aggregate,
            skipped_clients=sorted(int(c) for c in meta.get("skipped_clients", [])),
            upload_bytes={int(c): int(n) for c, n in meta.get("upload_bytes", {}).items()},
            download_bytes=nbytes_of(aggregate) if aggregate is not None else 0,
            link_seconds=delivery.received_at - ready_at,  # measured: uploads ready to aggregate back
            work_seconds=work + time.perf_counter() - decoding,
        )

    def describe_stall(self, round_index: int) -> str:
        return self.mailbox.describe_silence()

    def deliveries(self) -> list[dict[str, Any]]:
        """The arrivals not sent yet (for the final reply)."""
        sent, self._deliveries = self._deliveries, []
        return sent
