"""The per-round, per-client timeline of a run, and the federated wall-clock it implies.

Virtual clients run one after another on one device, so this process's clock mixes N
clients' compute. The timeline keeps what was measured (each client's compute seconds,
the exposed wait, the round's wall time) and what was counted (bytes per client), and
:func:`modelled_wallclock` turns them into the time a real federation would take with
clients in parallel, at any link, without re-running training (DESIGN §3, paper Fig. 2).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from lightning_parablock.comm.link import SimulatedLink
from lightning_parablock.files import write_text_atomic
from lightning_parablock.telemetry.timeline_checks import check_timeline

TIMELINE_FILENAME = "parablock_timeline.json"
MEASURED_EXCHANGE_PARTS = ("pickup", "to_server", "other_sites", "aggregate", "push", "to_clientapp", "to_site")
"""The parts of an exchange a real transport measures, in order (a Flower server's timeline holds them per round and
site under ``flower``): the uploads are taken from the site; reach the server; wait for the other sites; are
aggregated; the aggregate is pushed; the site's SuperNode starts a ClientApp for it; it hands it to the site."""


@dataclass
class RoundRecord:
    """What one round did and cost. Seconds are measured on this process unless named modelled."""

    round: int
    block: int
    participants: list[int]
    compute_seconds: dict[int, float]  # per client: its K local steps, measured
    client_loss: dict[int, float] = field(default_factory=dict)  # per client: mean training loss
    client_step_loss: dict[int, dict[int, float]] = field(default_factory=dict)  # per client: Trainer step -> loss
    exchanged_round: Optional[int] = None  # the round whose deltas crossed the link during this one
    upload_bytes: dict[int, int] = field(default_factory=dict)  # per sender of the exchanged round
    download_bytes: int = 0  # the aggregate, received by each sender
    skipped_clients: list[int] = field(default_factory=list)  # left out for a non-finite delta
    link_seconds: float = 0.0  # modelled: slowest client, upload then download
    comm_work_seconds: float = 0.0  # measured on the comm thread: copies and aggregation
    exposed_wait_seconds: float = 0.0  # measured: main thread blocked at the boundary
    wall_seconds: float = 0.0  # measured: the whole round on this process
    flush: bool = False  # an exchange after the last round (Algorithm 2, lines 12-14)
    probe_seconds: float = 0.0  # measured: the gradient schedule's probe, before anyone trains
    sync_download_bytes: dict[int, int] = field(default_factory=dict)  # per client, fetched before its turn
    rank: int = 0  # the process that measured this record (merged records: 0)
    client_rank: dict[int, int] = field(default_factory=dict)  # per client: the rank that trained it (several processes)
    ranks: dict[int, dict[str, float]] = field(default_factory=dict)  # per rank: its own wall, wait and comm seconds

    @property
    def process_compute_seconds(self) -> float:
        """Compute one process spent on the round: its clients one after another; with several ranks, the slowest."""
        if self.ranks:
            return max(rank["compute_seconds"] for rank in self.ranks.values())
        return sum(self.compute_seconds.values())

    @property
    def mean_client_loss(self) -> Optional[float]:
        """The round's training loss: the mean over its clients of each one's mean loss (``None``: no client)."""
        losses = list(self.client_loss.values())
        return sum(losses) / len(losses) if losses else None

    @property
    def bytes_moved(self) -> int:
        exchanged = sum(self.upload_bytes.values()) + self.download_bytes * len(self.upload_bytes)
        return exchanged + sum(self.sync_download_bytes.values())

    def client_link_seconds(self, link: SimulatedLink) -> dict[int, float]:
        """Modelled time each sender spends on this round's exchange over ``link``."""
        down = link.transfer_seconds(self.download_bytes)
        return {client: link.transfer_seconds(up) + down for client, up in self.upload_bytes.items()}


@dataclass
class RunSummary:
    rounds: int
    bytes_moved: int
    measured_seconds: float
    exposed_wait_seconds: float
    compute_seconds: float

    @classmethod
    def of(cls, records: Sequence[RoundRecord]) -> "RunSummary":
        return cls(
            rounds=sum(not r.flush for r in records),
            bytes_moved=sum(r.bytes_moved for r in records),
            measured_seconds=sum(r.wall_seconds for r in records),
            exposed_wait_seconds=sum(r.exposed_wait_seconds for r in records),
            compute_seconds=sum(r.process_compute_seconds + r.probe_seconds for r in records),
        )

    def format(self) -> str:
        return (
            f"rounds: {self.rounds}  bytes moved: {self.bytes_moved / 1e6:.2f} MB"
            f"  measured time: {self.measured_seconds:.1f}s (compute {self.compute_seconds:.1f}s,"
            f" exposed comm wait {self.exposed_wait_seconds:.2f}s)"
        )


def modelled_wallclock(records: Sequence[RoundRecord], link: SimulatedLink, staleness: int) -> float:
    """Seconds a federation with clients in parallel would take, from measured compute and counted bytes.

    ``staleness=0`` (FedBCD): each round costs max_i (compute_i + comm_i). ``staleness=s ≥ 1``
    (ParaBlock): round t costs max(max_i compute_i,t, max_j comm_j,t−s), and the final flush adds
    the last s exchanges. Any run's records serve for any staleness and link: compute and bytes
    per round do not depend on them. A client that first fetches the model (``sync_download_bytes``,
    FedCyBGD) does so before it computes; the gradient schedule's probe runs before anyone trains.
    """
    if staleness < 0:
        raise ValueError(f"`staleness` must be non-negative, got {staleness}.")
    compute = {r.round: _compute_after_sync(r, link) for r in records if not r.flush and r.compute_seconds}
    probes = sum(r.probe_seconds for r in records if not r.flush)
    comm = {r.exchanged_round: r.client_link_seconds(link) for r in records if r.exchanged_round is not None}
    if staleness == 0:
        return probes + sum(
            max(seconds + comm.get(t, {}).get(i, 0.0) for i, seconds in compute[t].items()) for t in compute
        )
    rounds = sorted(compute)
    total = probes + sum(
        max(max(compute[t].values()), max(comm.get(t - staleness, {}).values(), default=0.0)) for t in rounds
    )
    return total + sum(max(comm[t].values()) for t in rounds[-staleness:] if t in comm)


def _compute_after_sync(record: RoundRecord, link: SimulatedLink) -> dict[int, float]:
    """Per client: the model fetch before its turn (when it has one) and then its compute."""
    fetched = record.sync_download_bytes
    return {
        client: seconds + (link.transfer_seconds(fetched[client]) if client in fetched else 0.0)
        for client, seconds in record.compute_seconds.items()
    }


def overlap_efficiency(records: Sequence[RoundRecord]) -> float:
    """Σ max(compute, link) / Σ measured round time: 1.0 when comm hides entirely behind compute."""
    rounds = [r for r in records if not r.flush]
    ideal = sum(max(r.process_compute_seconds, r.link_seconds) for r in rounds)
    measured = sum(r.wall_seconds for r in rounds)
    return ideal / measured if measured > 0 else float("nan")


def merge_rank_records(records: Sequence[RoundRecord]) -> RoundRecord:
    """One round as every rank saw it: clients from all ranks, the slowest rank's seconds.

    Each rank measures only the clients it hosts; the exchange (bytes, modelled link) is the same
    on every rank. The round took as long as its slowest rank.
    """
    merged = RoundRecord(**{**asdict(records[0]), "rank": 0})
    for record in records[1:]:
        merged.compute_seconds.update(record.compute_seconds)
        merged.client_loss.update(record.client_loss)
        merged.client_step_loss.update(record.client_step_loss)
    merged.compute_seconds = dict(sorted(merged.compute_seconds.items()))
    merged.client_loss = dict(sorted(merged.client_loss.items()))
    merged.client_step_loss = dict(sorted(merged.client_step_loss.items()))
    merged.client_rank = {client: r.rank for r in records for client in sorted(r.compute_seconds)}
    merged.ranks = {
        r.rank: {
            "wall_seconds": r.wall_seconds,
            "exposed_wait_seconds": r.exposed_wait_seconds,
            "comm_work_seconds": r.comm_work_seconds,
            "compute_seconds": sum(r.compute_seconds.values()),
        }
        for r in records
    }
    merged.wall_seconds = max(r.wall_seconds for r in records)
    merged.exposed_wait_seconds = max(r.exposed_wait_seconds for r in records)
    merged.comm_work_seconds = max(r.comm_work_seconds for r in records)
    return merged


def run_folder(trainer: Any) -> Path:
    """Where a run's timeline goes: the logger's ``log_dir``; without a logger, the first free
    ``default_root_dir/parablock_runs/version_N``, so neither the bare working directory nor another run's
    timeline is written over (the caller keeps the folder for the rest of its fit)."""
    if trainer.loggers:
        return Path(trainer.log_dir)
    root = Path(trainer.default_root_dir) / "parablock_runs"
    taken = {p.name for p in root.glob("version_*")} if root.is_dir() else set()
    return root / f"version_{next(n for n in range(len(taken) + 1) if f'version_{n}' not in taken)}"


def save_timeline(path: Path, records: Sequence[RoundRecord], meta: dict[str, Any]) -> None:
    """Write the timeline as JSON atomically: a crash never leaves half a file."""
    write_text_atomic(path, json.dumps({**meta, "records": [asdict(r) for r in records]}, indent=1))


def record_from_json(data: dict[str, Any]) -> RoundRecord:
    """A record as written by :func:`save_timeline`; JSON turned its client keys into strings."""
    data = dict(data)
    for key in ("compute_seconds", "client_loss", "upload_bytes", "sync_download_bytes", "client_rank", "ranks"):
        data[key] = {int(client): value for client, value in data.get(key, {}).items()}
    data["client_step_loss"] = {
        int(client): {int(step): loss for step, loss in losses.items()}
        for client, losses in data.get("client_step_loss", {}).items()
    }
    return RoundRecord(**data)


def load_timeline(path: Path) -> tuple[dict[str, Any], list[RoundRecord]]:
    """The run's metadata and records from a timeline file."""
    with open(path) as stream:
        payload = json.load(stream)
    check_timeline(Path(path), payload, {f.name for f in fields(RoundRecord)})
    records = [record_from_json(r) for r in payload.pop("records")]
    return payload, records
