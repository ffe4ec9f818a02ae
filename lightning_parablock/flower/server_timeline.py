"""The federation's timeline, written by the Flower server from what every site and the server measured.

Each site sends its round records (compute per client, exposed wait, bytes) with its uploads; the server merges
them per round (one record per round, ``ranks`` holding each site, as for several processes) and adds the measured
exchanges: for each round and site, the exchange's latency from "uploads ready" to "aggregate back" (the site's own
clock) and its parts, stamped by the site, the ClientApp and the server (wall clocks of different processes: exact
on one machine, as good as the clocks' synchronization across machines). ``parablock report`` reads the file as any
timeline; its ``flower`` section holds the exchanges and the times of each site's rounds.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from lightning_parablock.telemetry.timeline import (
    TIMELINE_FILENAME,
    RoundRecord,
    merge_rank_records,
    record_from_json,
    save_timeline,
)


class ServerTimeline:
    """Collects the sites' records and the exchanges' stamps; writes the merged timeline after every round."""

    def __init__(self, output_dir: Path, num_sites: int, meta: dict[str, Any]) -> None:
        self.path = output_dir / TIMELINE_FILENAME
        self.num_sites = num_sites
        self.meta = meta
        self._records: dict[tuple[int, bool], dict[int, RoundRecord]] = defaultdict(dict)  # (round, flush) -> site
        self._round_times: dict[int, dict[int, dict[str, float]]] = defaultdict(dict)  # site -> round -> times
        self._stamps: dict[int, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))  # round, site
        self._server: dict[int, dict[str, float]] = defaultdict(dict)  # round -> server stamps

    def uploads(self, site: int, header: dict[str, Any], pulled_at: float) -> None:
        """A site's uploads of a round arrived: its stamps, records and round times."""
        stamps = self._stamps[int(header["round"])][site]
        stamps.update(
            ready_at=header["ready_at"], taken_at=header.get("taken_at", header["ready_at"]), pulled_at=pulled_at
        )
        self.telemetry(site, header)

    def telemetry(self, site: int, header: dict[str, Any]) -> None:
        """What a site's reply carries besides uploads: aggregates' arrival, round records, round times."""
        for delivery in header.get("deliveries", []):
            stamps = self._stamps[int(delivery["round"])][site]
            stamps["received_at"] = delivery["received_at"]
            if delivery.get("mailbox_started_at") is not None:
                stamps["mailbox_started_at"] = delivery["mailbox_started_at"]
        for data in header.get("records", []):
            record = record_from_json(data)
            record.rank = site
            self._records[(record.round, record.flush)][site] = record
        for round_index, times in header.get("round_times", {}).items():
            self._round_times[site][int(round_index)] = times

    def server_stamps(self, round_index: int, **stamps: float) -> None:
        self._server[round_index].update(stamps)

    def exchanges(self) -> list[dict[str, Any]]:
        """Each round's measured exchange per site: latency and parts in seconds (``None`` where unmeasured)."""
        rows = []
        for round_index in sorted(self._stamps):
            server = self._server.get(round_index, {})
            sites = {}
            for site, stamps in sorted(self._stamps[round_index].items()):
                sites[site] = {**_parts(stamps, server), "stamps": dict(stamps)}
            rows.append({"round": round_index, "sites": sites, "server": dict(server)})
        return rows

    def records(self) -> list[RoundRecord]:
        """One merged record per round every site has reported, in order (the rounds, then the flush)."""
        merged = [
            merge_rank_records([by_site[site] for site in sorted(by_site)])
            for (_, flush), by_site in sorted(self._records.items(), key=lambda item: (item[0][1], item[0][0]))
            if len(by_site) == self.num_sites
        ]
        return merged

    def save(self) -> Path:
        flower = {"sites": self.num_sites, "exchanges": self.exchanges(), "round_times": self._round_times}
        save_timeline(self.path, self.records(), {**self.meta, "transport": "flower", "flower": flower})
        return self.path


def _parts(stamps: dict[str, float], server: dict[str, float]) -> dict[str, Optional[float]]:
    """The exchange's latency (site clock) and its parts (``MEASURED_EXCHANGE_PARTS`` of the timeline module, each
    between two stamps; ``None`` if one is missing)."""

    def between(start: Optional[float], end: Optional[float]) -> Optional[float]:
        return None if start is None or end is None else max(0.0, end - start)

    get = stamps.get
    return {
        "latency": between(get("ready_at"), get("received_at")),
        "pickup": between(get("ready_at"), get("taken_at")),
        "to_server": between(get("taken_at"), get("pulled_at")),
        "other_sites": between(get("pulled_at"), server.get("all_pulled_at")),
        "aggregate": between(server.get("all_pulled_at"), server.get("aggregated_at")),
        "push": between(server.get("aggregated_at"), server.get("pushed_at")),
        "to_clientapp": between(server.get("pushed_at"), get("mailbox_started_at")),
        "to_site": between(get("mailbox_started_at"), get("received_at")),
    }
