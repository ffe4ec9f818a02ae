"""A Flower federation in one process: a fake Grid whose nodes run the real ClientApp against real site mailboxes,
and fake trainers that exchange synthetic deltas through the real site transport on the real communication thread.

Only Flower's processes (SuperLink, SuperNodes, the per-message ClientApp process) are left out; every message is a
real ``flwr.app.Message``, relayed by the ClientApp's own handler, one at a time per node as a SuperNode does.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from lightning_parablock.aggregation.aggregator import Aggregator
from lightning_parablock.comm.transport import RoundUploads
from lightning_parablock.comm.worker import CommWorker
from lightning_parablock.flower.app.parablock_app.mailbox import relay
from lightning_parablock.flower.plug import aggregator_settings
from lightning_parablock.flower.site_mailbox import SiteMailbox
from lightning_parablock.flower.site_transport import FlowerSiteTransport

LAYOUT = [("block.weight", torch.Size([4, 3])), ("block.bias", torch.Size([4]))]


class FakeGrid:
    """``get_node_ids`` / ``push_messages`` / ``pull_messages`` over nodes that relay to site mailboxes."""

    def __init__(self, node_configs: dict[int, dict[str, str]]) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.node_configs = node_configs
        self.pushed: list[Message] = []
        self._replies: dict[str, Message] = {}
        self._lock = threading.Lock()
        self._queues = {node: queue.SimpleQueue() for node in node_configs}
        for node in node_configs:
            threading.Thread(target=self._supernode, args=(node,), daemon=True).start()

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.pushed.append(message)
            self._queues[message.metadata.dst_node_id].put(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        with self._lock:
            return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def messages_per_node(self) -> Counter:
        return Counter((m.metadata.dst_node_id, m.metadata.message_type) for m in self.pushed)

    def _supernode(self, node: int) -> None:
        context = Context(
            run_id=1, node_id=node, node_config=self.node_configs[node], state=RecordDict(), run_config={}
        )
        while True:
            message = self._queues[node].get()
            reply = relay(message, context)
            with self._lock:
                self._replies[message.metadata.message_id] = reply


def client_delta(client: int, round_index: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * round_index + client)
    return {name: torch.randn(shape, generator=generator) for name, shape in LAYOUT}


def hello(
    site: int, num_sites: int, placement: list[int], rounds: int, staleness: int, aggregator: Aggregator, **changes
) -> dict:
    return {
        "site": site, "num_sites": num_sites, "library_version": "test", "num_clients": len(placement),
        "placement": placement, "rounds": rounds, "staleness": staleness, "codec": "none",
        "aggregator": aggregator_settings(aggregator), "comm_timeout": 30.0,
        "layout": [[[n, list(s)] for n, s in LAYOUT], [[n, list(s)] for n, s in LAYOUT]],
        "settings": {"method": "parablock", "staleness": staleness}, "next_round": 0, "resume_epoch": 0,
        "weights_sha256": "0" * 64, **changes,
    }  # fmt: skip


class FakeSite:
    """A site's trainer reduced to its exchange: per round its clients' synthetic deltas go up at the staleness's
    moment through the real transport and communication thread; what came back is kept per round."""

    def __init__(
        self,
        folder: Path,
        site: int,
        placement: list[int],
        rounds: int,
        staleness: int,
        hello_info: dict,
        delta: Callable[[int, int], dict[str, torch.Tensor]] = client_delta,
        fail_in_round: Optional[int] = None,
        start_epoch: int = 0,
    ) -> None:
        self.site, self.placement, self.rounds, self.staleness = site, placement, rounds, staleness
        self.start_epoch = start_epoch  # a resume: rounds start_epoch - staleness .. start_epoch - 1 are pending
        self.delta, self.fail_in_round = delta, fail_in_round
        self.mailbox = SiteMailbox(folder / f"s{site}.sock", folder / f"s{site}.key", site)
        self.mailbox.publish_hello(hello_info)
        transport = FlowerSiteTransport(self.mailbox, lambda block: LAYOUT, "none", lambda: {})
        self.worker = CommWorker(transport, 30.0)
        self.results: dict[int, Any] = {}
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._train, daemon=True)

    @property
    def node_config(self) -> dict[str, str]:
        return {"parablock-mailbox": str(self.mailbox.socket_path), "parablock-key": str(self.mailbox.key_file)}

    def start(self) -> "FakeSite":
        self.thread.start()
        return self

    def _submit(self, round_index: int) -> None:
        clients = [c for c in range(len(self.placement)) if self.placement[c] == self.site]
        deltas = {c: self.delta(c, round_index) for c in clients}
        self.worker.submit(RoundUploads(round_index, round_index % 2, deltas, {c: float(c + 1) for c in clients}))

    def _train(self) -> None:
        try:
            self.mailbox.wait_started(timeout_s=30)
            s = self.staleness
            for t in range(self.start_epoch, self.rounds):
                if s > 0 and t - s >= 0:
                    self._submit(t - s)
                time.sleep(0.05)  # the round's compute
                if self.fail_in_round == t:
                    raise RuntimeError(f"simulated failure of site {self.site}")
                if s == 0:
                    self._submit(t)
                if t - s >= 0:
                    self.results[t - s] = self.worker.wait(t - s)
            for pending in range(max(self.rounds - s, 0), self.rounds):  # the flush
                self._submit(pending)
                self.results[pending] = self.worker.wait(pending)
            self.mailbox.finish({"site": self.site, "deliveries": []})
        except BaseException as error:  # noqa: BLE001 - the test reads it
            self.error = error
            self.mailbox.fail(f"site {self.site} failed: {type(error).__name__}: {error}")
        finally:
            self.worker.shutdown()

    def close(self) -> None:
        self.worker.shutdown()
        self.mailbox.close()
