"""The Flower server's federation: the handshake, the staleness pipeline, the final message, and faults.

One message per site per round. The message of round ``r`` carries the aggregate of round ``r − 1`` and asks for
the uploads of round ``r``; the site's trainer applies that aggregate at its round boundary and posts the uploads
when its staleness says so (at the start of round ``r + s``, or at the end of round ``r`` for ``s = 0``), so the
server's loop is the same for every staleness: it never waits on anything but the sites' replies, polled with
``pull_messages`` (``send_and_receive`` would sleep 3 s between polls). The aggregate is the library's own
aggregator over every client's decoded delta, in client order, as in one process: bit-identical to it. After the
last round's uploads a ``final`` message delivers the last aggregate (the sites' flush of Algorithm 2 is their
last requests) and collects the sites' last records.

A site that fails, refuses or does not answer within its deadline (``comm_timeout``: one round of compute plus the
exchange; the first reply of a run ``staleness`` rounds) ends the run: every site gets a ``stop`` naming the failed
site and round, and stops at its next batch instead of waiting for its own timeout.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from flwr.app import Message

from lightning_parablock.aggregation.nonfinite import NonFiniteDeltaError, non_finite_clients
from lightning_parablock.files import write_text_atomic
from lightning_parablock.flower.app.parablock_app.records import to_content, to_frame
from lightning_parablock.flower.app.parablock_app.wire import WireArray, WireError, wall_clock
from lightning_parablock.flower.arrays import aggregate_to_wire, encoded_nbytes_on_wire, uploads_from_wire
from lightning_parablock.flower.handshake import HandshakeRefused, RunAgreement, check_hellos
from lightning_parablock.flower.plug import aggregator_from_settings
from lightning_parablock.flower.server_timeline import ServerTimeline

STATE_FILENAME = "parablock_server_state.json"


class SiteFailed(RuntimeError):
    """A site failed, refused or stopped answering: the federation stops, naming it and the round."""

    def __init__(
        self, site: Optional[int], round_index: Optional[int], reason: str, node: Optional[int] = None
    ) -> None:
        who = f"site {site}" if site is not None else f"the site on Flower node {node}"
        where = f" in round {round_index}" if round_index is not None else ""
        super().__init__(f"{who} failed{where}: {reason}")
        self.site, self.round, self.node = site, round_index, node


@dataclass(frozen=True)
class ServerSettings:
    """The server's own settings, from ``flwr run``'s run config (``--run-config "num-sites=2 output-dir='...'"``).

    Args:
        num_sites: sites in the federation (each a SuperNode with its trainer).
        output_dir: where the server writes the federation's timeline and its round record (absolute path).
        wait_for_sites_s: how long to wait for every site's SuperNode to connect and answer the handshake.
        poll_s: how often replies are pulled from the SuperLink.
    """

    num_sites: int
    output_dir: Path
    wait_for_sites_s: float = 600.0
    poll_s: float = 0.1

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> "ServerSettings":
        num_sites, output = config.get("num-sites"), str(config.get("output-dir", ""))
        if not isinstance(num_sites, int) or num_sites < 1:
            raise ValueError(f"run config `num-sites` must be a whole number >= 1, got {num_sites!r}.")
        if not output or not Path(output).is_absolute():
            raise ValueError(
                f"run config `output-dir` must be an absolute folder for the federation's timeline, got {output!r}"
                " (flwr run ... --run-config \"output-dir='/srv/parablock/run1'\")."
            )
        wait, poll = float(config.get("wait-for-sites", 600.0)), float(config.get("poll", 0.1))
        if not (wait > 0 and poll > 0):
            raise ValueError(f"run config `wait-for-sites` and `poll` must be positive seconds, got {wait} and {poll}.")
        return cls(num_sites, Path(output), wait, poll)


@dataclass
class _Uploads:
    block: int
    weights: dict[int, float]
    deltas: dict[int, dict[str, Any]]
    nbytes: dict[int, int]


class FederationServer:
    """Runs one federation over ``grid`` (Flower's ``Grid``, or anything with its ``get_node_ids``,
    ``push_messages`` and ``pull_messages``)."""

    def __init__(
        self,
        grid: Any,
        settings: ServerSettings,
        log: Callable[[str], None] = lambda line: print(line, flush=True),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.grid, self.settings, self.log, self.clock, self.sleep = grid, settings, log, clock, sleep
        self.state_path = settings.output_dir / STATE_FILENAME
        self._site_of: dict[int, int] = {}  # node -> site, once the handshake agreed

    # ----------------------------------------------------------------------------------------------- the run

    def run(self) -> None:
        """Handshake, rounds, final message; raises :class:`SiteFailed` or :class:`HandshakeRefused` after telling
        every site to stop."""
        self.settings.output_dir.mkdir(parents=True, exist_ok=True)
        nodes = self._wait_for_nodes()
        wait = self.settings.wait_for_sites_s  # a site's trainer may still be loading: its mailbox comes up later
        hello = {"kind": "hello", "reply_timeout_s": wait, "connect_timeout_s": wait}
        try:
            hellos = self._ask({node: ("hello", hello, []) for node in nodes}, wait, None)
            agreement = check_hellos(
                {node: header for node, (header, _) in hellos.items()},
                self.settings.num_sites,
                self._server_round(),
                str(self.state_path),
            )
        except (HandshakeRefused, SiteFailed) as refused:
            self._stop(nodes, f"the Flower server refused the handshake: {refused}", self.settings.wait_for_sites_s)
            raise
        self._site_of = dict(agreement.sites)
        self.log(
            f"[parablock] {self.settings.num_sites} sites agree: {agreement.hello['num_clients']} clients,"
            f" {agreement.rounds} rounds, staleness {agreement.staleness}, codec {agreement.hello['codec']};"
            f" starting at round {agreement.start_round}"
        )
        try:
            self._rounds(agreement)
        except SiteFailed as failure:
            self._stop(nodes, str(failure), 2 * agreement.comm_timeout)
            raise

    def _rounds(self, agreement: RunAgreement) -> None:
        """Round by round: collect the replies to the message of round ``r``, aggregate, and push the message of
        round ``r + 1`` (which carries the aggregate) before anything else: the record, the timeline and the round's
        line are written while the sites work."""
        aggregator = aggregator_from_settings(agreement.hello["aggregator"])
        timeline = ServerTimeline(self.settings.output_dir, self.settings.num_sites, _meta(agreement))
        nodes = sorted(agreement.sites, key=agreement.sites.get)

        def deadline(round_index: int) -> float:
            """A reply takes a round of compute and the exchange; the first one ``first_reply_rounds`` rounds."""
            return agreement.comm_timeout * (
                agreement.first_reply_rounds if round_index == agreement.start_round else 1
            )

        def push(round_index: int, aggregate: Optional[dict[str, Any]], arrays: list[WireArray]) -> dict[str, int]:
            kind = "final" if round_index == agreement.rounds else "exchange"
            header = {
                "kind": kind,
                "round": round_index,
                "aggregate": aggregate,
                "reply_timeout_s": deadline(round_index),
            }
            return self._push({node: (kind, header, arrays) for node in nodes}, round_index)

        pending = push(agreement.start_round, None, [])
        for round_index in range(agreement.start_round, agreement.rounds + 1):
            final = round_index == agreement.rounds
            uploads: dict[int, _Uploads] = {}

            def arrived(site: int, reply: dict[str, Any], arrays: list[WireArray], pulled_at: float) -> None:
                if final:
                    timeline.telemetry(site, reply)
                    return
                uploads[site] = self._check_uploads(site, reply, arrays, round_index, agreement)
                timeline.uploads(site, reply, pulled_at)

            self._collect(pending, deadline(round_index), round_index, arrived)
            if final:
                break
            all_pulled_at = wall_clock()
            meta, arrays = self._aggregate(round_index, uploads, aggregator, agreement)
            aggregated_at = wall_clock()
            pending = push(round_index + 1, meta, arrays)
            stamps = {"all_pulled_at": all_pulled_at, "aggregated_at": aggregated_at, "pushed_at": wall_clock()}
            timeline.server_stamps(round_index, **stamps)
            write_text_atomic(self.state_path, json.dumps({"next_round": round_index + 1}))
            timeline.save()
            self._log_round(round_index, meta, aggregated_at - all_pulled_at, timeline)
        path = timeline.save()
        self.log(f"[parablock] federation done after {agreement.rounds} rounds; timeline: {path}")

    # --------------------------------------------------------------------------------------------- a round

    def _check_uploads(
        self, site: int, reply: dict[str, Any], arrays: list[WireArray], round_index: int, agreement: RunAgreement
    ) -> _Uploads:
        """One site's uploads of ``round_index``, decoded; every client, name, dtype and shape checked."""
        where = f"its uploads of round {round_index}"
        try:
            if reply.get("round") != round_index:
                raise WireError(f"{where} say they are of round {reply.get('round')!r}")
            block, codec = reply.get("block"), reply.get("codec")
            if not isinstance(block, int) or not 0 <= block < len(agreement.hello["layout"]):
                raise WireError(f"{where} are of block {block!r}, the model has {len(agreement.hello['layout'])}")
            if codec != agreement.hello["codec"]:
                raise WireError(f"{where} are encoded with {codec!r}, the run with {agreement.hello['codec']!r}")
            weights = {}
            for client_text, weight in dict(reply.get("weights", {})).items():
                client = int(client_text) if str(client_text).isdigit() else -1
                if not 0 <= client < len(agreement.placement) or agreement.placement[client] != site:
                    raise WireError(f"{where} hold client {client_text!r}, which site {site} does not host")
                if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                    raise WireError(f"{where} weigh client {client} with {weight!r}")
                weights[client] = float(weight)
            deltas = uploads_from_wire(arrays, sorted(weights), codec, agreement.layout(block), where)
        except (WireError, ValueError, TypeError) as error:
            raise SiteFailed(site, round_index, str(error)) from None
        return _Uploads(block, weights, deltas, {c: encoded_nbytes_on_wire(arrays, c) for c in weights})

    def _aggregate(
        self, round_index: int, uploads: dict[int, _Uploads], aggregator: Any, agreement: RunAgreement
    ) -> tuple[dict[str, Any], list[WireArray]]:
        """The round's aggregate over every site's clients, by the sites' own aggregator (bit-identical to one
        process's), with the non-finite policy deciding per client."""
        blocks = {site: u.block for site, u in uploads.items()}
        if len(set(blocks.values())) > 1:
            site = max(blocks, key=lambda s: blocks[s] != blocks[min(blocks)])
            raise SiteFailed(
                site, round_index, f"it trained block {blocks[site]}, site {min(blocks)} block {blocks[min(blocks)]}"
            )
        block = next(iter(blocks.values()))
        deltas = {c: d for u in uploads.values() for c, d in u.deltas.items()}
        weights = {c: w for u in uploads.values() for c, w in u.weights.items()}
        nbytes = {c: n for u in uploads.values() for c, n in u.nbytes.items()}
        meta: dict[str, Any] = {"round": round_index, "block": block, "kept": False, "skipped_clients": [],
                                "upload_bytes": {str(c): nbytes[c] for c in sorted(nbytes)}}  # fmt: skip
        if not deltas:
            return meta, []
        try:
            result = aggregator(dict(sorted(deltas.items())), weights)
        except NonFiniteDeltaError as error:
            bad = sorted(non_finite_clients(deltas))
            sites = sorted({agreement.placement[c] for c in bad})
            raise SiteFailed(
                sites[0] if sites else None, round_index, f"{error} (client(s) {bad} on site(s) {sites})"
            ) from None
        meta.update(kept=True, skipped_clients=list(result.skipped_clients))
        if result.skipped_clients:
            self.log(
                f"[parablock] round {round_index}: left clients {result.skipped_clients} out of the aggregate for a"
                " non-finite delta; their sites are told, and they resume from the global model."
            )
        return meta, aggregate_to_wire(result.aggregate)

    def _log_round(self, round_index: int, meta: dict[str, Any], aggregate_s: float, timeline: ServerTimeline) -> None:
        uploaded = sum(meta["upload_bytes"].values())
        line = (
            f"[parablock] round {round_index} block {meta['block']}: {len(meta['upload_bytes'])} clients from"
            f" {self.settings.num_sites} sites, {uploaded / 1e6:.2f} MB up, aggregated in"
            f" {aggregate_s:.2f}s"
        )
        previous = [row for row in timeline.exchanges() if row["round"] == round_index - 1]
        latencies = [s["latency"] for row in previous for s in row["sites"].values() if s["latency"] is not None]
        if latencies:
            line += (
                f"; exchange of round {round_index - 1} took {max(latencies):.1f}s (uploads ready to aggregate back)"
            )
        self.log(line)

    # ------------------------------------------------------------------------------------------- messages

    def _wait_for_nodes(self) -> list[int]:
        waited_from = self.clock()
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.settings.num_sites:
                return nodes  # more than num_sites: the handshake names the extra ones
            if self.clock() - waited_from > self.settings.wait_for_sites_s:
                raise HandshakeRefused(
                    f"only {len(nodes)} of {self.settings.num_sites} sites' SuperNodes connected within"
                    f" {self.settings.wait_for_sites_s:.0f}s"
                )
            self.sleep(max(self.settings.poll_s, 0.5))

    def _ask(
        self,
        requests: Mapping[int, tuple[str, dict[str, Any], Sequence[WireArray]]],
        deadline_s: float,
        round_index: Optional[int],
    ) -> dict[int, tuple[dict[str, Any], list[WireArray]]]:
        """Push one message per node and collect every reply (see :meth:`_collect`)."""
        return self._collect(self._push(requests, round_index), deadline_s, round_index)

    def _push(
        self, requests: Mapping[int, tuple[str, dict[str, Any], Sequence[WireArray]]], round_index: Optional[int]
    ) -> dict[str, int]:
        """One message per node (``action``, header, arrays); the pushed messages' ids, to the node."""
        messages = [
            Message(to_content(header, list(arrays)), node, f"train.{action}", group_id=str(round_index))
            for node, (action, header, arrays) in requests.items()
        ]
        ids = list(self.grid.push_messages(messages))
        pending = {message_id: node for message_id, node in zip(ids, requests) if message_id}
        if len(pending) != len(requests):
            raise SiteFailed(None, round_index, "the SuperLink refused to take a message", node=list(requests)[0])
        return pending

    def _collect(
        self,
        pending: dict[str, int],
        deadline_s: float,
        round_index: Optional[int],
        arrived: Optional[Callable[[int, dict[str, Any], list[WireArray], float], None]] = None,
    ) -> dict[int, tuple[dict[str, Any], list[WireArray]]]:
        """Pull until every pushed message has its reply; an error or a missed deadline is a :class:`SiteFailed`.
        ``arrived(site, header, arrays, pulled_at)`` sees each reply as it comes (a site's uploads are checked and
        decoded while the others are awaited)."""
        pending = dict(pending)
        replies: dict[int, tuple[dict[str, Any], list[WireArray]]] = {}
        until = self.clock() + deadline_s
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                site = self._site_of.get(node)
                if reply.has_error():
                    reason = (reply.error.reason or f"error code {reply.error.code}").strip().splitlines()[-1]
                    raise SiteFailed(site, round_index, reason, node=node)
                try:
                    header, arrays = to_frame(reply.content)
                except WireError as error:
                    raise SiteFailed(site, round_index, str(error), node=node) from None
                replies[node] = (header, arrays)
                if arrived is not None and site is not None:
                    arrived(site, header, arrays, wall_clock())
            if pending and self.clock() > until:
                node = min(pending.values())
                reason = f"no answer within {deadline_s:.0f}s (comm_timeout)"
                raise SiteFailed(self._site_of.get(node), round_index, reason, node=node)
            if pending:
                self.sleep(self.settings.poll_s)
        return replies

    def _stop(self, nodes: Sequence[int], reason: str, deadline_s: float) -> None:
        """Tell every site to stop, naming why; wait (up to ``deadline_s``) until each confirmed or is gone.

        A site's stop waits behind the message its SuperNode is handling (one at a time): a trainer still computing
        the round hears it when it posts that round's uploads, then stops at its next batch.
        """
        self.log(f"[parablock] stopping the federation: {reason}")
        header = {"kind": "abort", "reason": reason, "reply_timeout_s": deadline_s}
        messages = [Message(to_content(header, []), node, "train.abort", group_id="stop") for node in nodes]
        pending = {message_id for message_id in self.grid.push_messages(messages) if message_id}
        until = self.clock() + deadline_s
        while pending and self.clock() < until:
            for reply in self.grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)  # told, or gone: either way done
            if pending:
                self.sleep(self.settings.poll_s)

    def _server_round(self) -> Optional[int]:
        """The next round to aggregate, as this output folder records it (``None``: a new run)."""
        if not self.state_path.is_file():
            return None
        try:
            return int(json.loads(self.state_path.read_text())["next_round"])
        except (ValueError, KeyError, TypeError) as error:
            raise HandshakeRefused(f"{self.state_path} is not a parablock server record ({error!r})") from None


def _meta(agreement: RunAgreement) -> dict[str, Any]:
    hello = agreement.hello
    return {
        "method": hello["settings"].get("method"),
        "staleness": agreement.staleness,
        "link": {"bandwidth": None, "latency": "0s"},
        "compression": hello["settings"].get("compression"),
        "num_clients": hello["num_clients"],
        "num_blocks": len(hello["layout"]),
        "world_size": len(agreement.sites),
    }
