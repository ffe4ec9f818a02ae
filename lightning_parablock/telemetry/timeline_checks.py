"""A timeline read from disk is checked before anything is modelled from it.

The report trusts its numbers: a negative or non-numeric second, a round without clients or a byte count that is
not a whole number would print negative modelled times or end in a ``TypeError``. Each bad value is named with its
record and field, so a hand-edited or corrupt file is found where it is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Set
from pathlib import Path
from typing import Any

_REQUIRED = ("round", "block", "participants", "compute_seconds")
_SECONDS = ("link_seconds", "comm_work_seconds", "exposed_wait_seconds", "wall_seconds", "probe_seconds")
_COUNTS = ("round", "block", "download_bytes", "rank")
_PER_CLIENT_SECONDS = ("compute_seconds",)
_PER_CLIENT_COUNTS = ("upload_bytes", "sync_download_bytes", "client_rank")


class TimelineError(ValueError):
    """A timeline file holds a value no run can have written."""


def check_timeline(path: Path, payload: Any, record_fields: Set[str]) -> None:
    """Refuse a timeline whose metadata or records hold impossible values, naming the record and field
    (``record_fields``: those of a round's record)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("records"), list):
        raise TimelineError(f"{path} is not a timeline written by ParaBlockCallback (no list of `records`).")
    for name, minimum in (("staleness", 0), ("num_clients", 1), ("world_size", 1)):
        value = payload.get(name)
        if value is not None and not _is_count(value, minimum):
            raise TimelineError(f"{path}: `{name}` is {value!r}; a run has a whole number >= {minimum} there.")
    known = set(record_fields)
    for index, record in enumerate(payload["records"]):
        where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise TimelineError(f"{where} is {type(record).__name__}, not an object of a round's fields.")
        unknown = sorted(set(record) - known)
        if unknown:
            raise TimelineError(f"{where} has unknown field(s) {unknown}; a round's fields are {sorted(known)}.")
        missing = [name for name in _REQUIRED if name not in record]
        if missing:
            raise TimelineError(f"{where} lacks {missing}: not a timeline written by ParaBlockCallback.")
        where += f" (round {record['round']})"
        _check_record(where, record)


def _check_record(where: str, record: dict[str, Any]) -> None:
    for name in _COUNTS:
        if name in record and not _is_count(record[name]):
            raise TimelineError(f"{where}: `{name}` is {record[name]!r}, not a whole number >= 0.")
    for name in _SECONDS:
        if name in record and not _is_seconds(record[name]):
            raise TimelineError(f"{where}: `{name}` is {record[name]!r}, not a finite number of seconds >= 0.")
    exchanged = record.get("exchanged_round")
    if exchanged is not None and not _is_count(exchanged):
        raise TimelineError(f"{where}: `exchanged_round` is {exchanged!r}, not a round number or null.")
    participants = record.get("participants")
    if not isinstance(participants, list) or not all(_is_count(c) for c in participants):
        raise TimelineError(f"{where}: `participants` is {participants!r}, not a list of client numbers.")
    if not participants and not record.get("flush", False):
        raise TimelineError(f"{where}: `participants` is empty; every trained round has at least one client.")
    for name in _PER_CLIENT_SECONDS + _PER_CLIENT_COUNTS + ("client_loss",):
        values = record.get(name, {})
        if not isinstance(values, dict):
            raise TimelineError(f"{where}: `{name}` is {values!r}, not an object from client to value.")
        for client, value in values.items():
            if not str(client).isdigit():
                raise TimelineError(f"{where}: `{name}` has the key {client!r}, not a client number.")
            valid = (
                _is_seconds(value) if name in _PER_CLIENT_SECONDS
                else _is_count(value) if name in _PER_CLIENT_COUNTS
                else _is_number(value)
            )  # fmt: skip
            if not valid:
                raise TimelineError(f"{where}: `{name}` of client {client} is {value!r}, which no run measures.")
    for rank, measured in record.get("ranks", {}).items():
        for name, value in (measured.items() if isinstance(measured, dict) else [("", measured)]):
            if not _is_seconds(value):
                raise TimelineError(f"{where}: `ranks` of rank {rank}: `{name}` is {value!r}, not seconds >= 0.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_seconds(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and value >= 0


def _is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
