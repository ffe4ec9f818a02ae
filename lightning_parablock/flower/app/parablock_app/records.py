"""A message's content as the mailbox's frames carry it: a JSON header and named raw arrays, both ways.

The server and the ClientApp share this: a ``parablock`` ConfigRecord holds the header (JSON), an ``arrays``
ArrayRecord the arrays as Flower ``Array``s of :data:`STYPE` (raw bytes, never numpy's pickle-capable format), in
the order the header lists them with their dtypes and shapes. Reading checks that both agree.
"""

from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from . import wire

HEADER_RECORD = "parablock"
ARRAY_RECORD = "arrays"
STYPE = "parablock/raw-le"
"""Flower's ``Array.stype`` of our arrays: raw C-contiguous little-endian bytes, never numpy's pickle-capable
format."""


def to_frame(content: RecordDict) -> tuple[dict, list[wire.WireArray]]:
    """A message's content as a frame's header and arrays; every array must be the header's, of its dtype and shape."""
    if HEADER_RECORD not in content.config_records:
        raise wire.WireError(f"the message carries no {HEADER_RECORD!r} record: not sent by the parablock server")
    try:
        header = json.loads(str(content.config_records[HEADER_RECORD]["header"]))
    except (KeyError, json.JSONDecodeError) as error:
        raise wire.WireError(f"the message's header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise wire.WireError("the message's header must be a JSON object")
    record = content.array_records.get(ARRAY_RECORD, ArrayRecord())
    listed = header.pop("arrays", [])
    if not isinstance(listed, list) or [e.get("name") if isinstance(e, dict) else e for e in listed] != list(record):
        raise wire.WireError(f"the message's arrays {list(record)} are not the ones its header lists")
    arrays = []
    for entry in listed:
        array = record[entry["name"]]
        if array.stype != STYPE or array.dtype != entry.get("dtype") or list(array.shape) != entry.get("shape"):
            raise wire.WireError(
                f"array {entry['name']!r} is {array.dtype} {list(array.shape)} ({array.stype}), its header says"
                f" {entry.get('dtype')} {entry.get('shape')} ({STYPE})"
            )
        arrays.append(wire.WireArray(entry["name"], array.dtype, tuple(array.shape), array.data))
    return header, arrays


def to_content(header: dict, arrays: list[wire.WireArray]) -> RecordDict:
    """A frame's header and arrays as a message's content (the arrays' bytes as they are)."""
    listed = [{"name": a.name, "dtype": a.dtype, "shape": list(a.shape)} for a in arrays]
    record = ArrayRecord({a.name: Array(a.dtype, tuple(a.shape), STYPE, bytes(a.data)) for a in arrays})
    header_json = json.dumps({**header, "arrays": listed}, allow_nan=False)
    return RecordDict({HEADER_RECORD: ConfigRecord({"header": header_json}), ARRAY_RECORD: record})
