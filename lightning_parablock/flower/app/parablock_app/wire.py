"""The mailbox wire protocol between a site's trainer and its ClientApp: versioned frames, never a pickle.

A site's trainer is a long-lived process; Flower starts a short-lived ClientApp process per message. The two meet
on a Unix socket the trainer listens on. Whoever connects must prove it holds the site's key (an HMAC of a fresh
nonce), then hands over what the server sent and waits for the trainer's reply, which may be preceded by
keep-alive frames while the trainer computes: ``challenge`` (site), ``auth`` (ClientApp), ``welcome`` (site), the
request (ClientApp: ``hello``, ``exchange``, ``final`` or ``abort``), then zero or more ``keepalive`` and a ``reply``
(site); the site answers ``refuse`` with a reason instead wherever it cannot go on.

A frame is ``b"PBLK"``, the header's length (4 bytes, big-endian), the header (a UTF-8 JSON object), then the raw
bytes of the arrays the header lists, in order. Every header carries ``protocol`` (:data:`PROTOCOL_VERSION`) and
``kind``; ``arrays`` lists each array's ``name``, ``dtype`` and ``shape``. Arrays are C-contiguous little-endian
bytes of a dtype in :data:`DTYPES`; a reader allocates only what the header declares, after checking every name,
dtype and shape, and refuses anything else. Nothing here imports more than the standard library: the ClientApp
starts once per message, and what it imports is paid every time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

PROTOCOL_VERSION = 1
"""Raised whenever a frame's layout or meaning changes; both ends refuse a frame of another version."""

MAGIC = b"PBLK"
MAX_HEADER_BYTES = 16 * 2**20
MAX_NAME_LENGTH = 512
KEY_BYTES = 32
SILENCE_TIMEOUT_S = 60.0
"""How long a ClientApp waits without a frame (a site's trainer sends a keep-alive every few seconds) before it
takes the trainer's process for hung."""

DTYPES = {
    "float32": 4, "float64": 8, "float16": 2, "bfloat16": 2,
    "int8": 1, "uint8": 1, "int16": 2, "int32": 4, "int64": 8, "bool": 1,
}  # fmt: skip
"""Element sizes of the dtypes a frame may carry (torch's names; Flower's ``Array.dtype`` carries them as they are)."""

Bytes = Union[bytes, bytearray, memoryview]


class WireError(ValueError):
    """A frame that breaks the protocol: wrong magic, version, kind, name, dtype, shape or size."""


class MailboxRefused(RuntimeError):
    """The other end answered with a ``refuse`` frame: its reason is the message."""


@dataclass(frozen=True)
class WireArray:
    """One array of a frame: raw little-endian bytes of ``dtype`` in ``shape``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: Bytes

    def __post_init__(self) -> None:
        check_array(self.name, self.dtype, self.shape, len(self.data))


@dataclass
class Frame:
    header: dict[str, Any]
    arrays: list[WireArray]

    @property
    def kind(self) -> str:
        return self.header["kind"]

    def array_map(self) -> dict[str, WireArray]:
        return {array.name: array for array in self.arrays}


def nbytes_of(dtype: str, shape: Sequence[int]) -> int:
    return DTYPES[dtype] * math.prod(shape)


def check_array(name: Any, dtype: Any, shape: Any, nbytes: Optional[int] = None) -> None:
    """Refuse an array whose name, dtype or shape is not one a frame may carry, or whose bytes do not fit them."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise WireError(f"array name {name!r} is not a printable string of 1 to {MAX_NAME_LENGTH} characters")
    if dtype not in DTYPES:
        raise WireError(f"array {name!r} has dtype {dtype!r}; a frame carries only {sorted(DTYPES)}")
    if not isinstance(shape, (list, tuple)) or not all(type(n) is int and n >= 0 for n in shape):
        raise WireError(f"array {name!r} has shape {shape!r}; expected a list of non-negative integers")
    if nbytes is not None and nbytes != nbytes_of(dtype, shape):
        raise WireError(
            f"array {name!r} ({dtype}, shape {list(shape)}) should be {nbytes_of(dtype, shape)} bytes, got {nbytes}"
        )


def frame_parts(header: dict[str, Any], arrays: Iterable[WireArray] = ()) -> list[Bytes]:
    """A frame as the buffers to send one after another (arrays are not copied into one buffer)."""
    arrays = list(arrays)
    names = [array.name for array in arrays]
    if len(set(names)) != len(names):
        raise WireError(f"a frame's array names must be unique, got {names}")
    full = {
        **header,
        "protocol": PROTOCOL_VERSION,
        "arrays": [{"name": a.name, "dtype": a.dtype, "shape": list(a.shape)} for a in arrays],
    }
    encoded = json.dumps(full, allow_nan=False).encode("utf-8")
    if len(encoded) > MAX_HEADER_BYTES:
        raise WireError(f"a frame header of {len(encoded)} bytes is over the limit of {MAX_HEADER_BYTES}")
    return [MAGIC + struct.pack(">I", len(encoded)) + encoded, *(array.data for array in arrays)]


def send_frame(sock: socket.socket, header: dict[str, Any], arrays: Iterable[WireArray] = ()) -> None:
    for part in frame_parts(header, arrays):
        sock.sendall(part)


def _read_exactly(sock: socket.socket, count: int) -> bytearray:
    buffer = bytearray(count)
    view = memoryview(buffer)
    received = 0
    while received < count:
        got = sock.recv_into(view[received:], count - received)
        if got == 0:
            raise ConnectionError(f"the mailbox connection closed after {received} of {count} bytes of a frame")
        received += got
    return buffer


def read_frame(sock: socket.socket, kinds: Optional[Sequence[str]] = None, max_bytes: Optional[int] = None) -> Frame:
    """The next frame on ``sock``, checked; a ``refuse`` frame raises :class:`MailboxRefused` with its reason.

    ``kinds`` are the frame kinds expected here (any other is refused before its arrays are read); ``max_bytes``
    bounds the arrays' total (``0`` for the handshake's frames, read before the other end proved it holds the key).
    The socket's timeout bounds each read.
    """
    start = _read_exactly(sock, len(MAGIC) + 4)
    if bytes(start[:4]) != MAGIC:
        raise WireError(f"not a parablock mailbox frame (starts with {bytes(start[:4])!r}, expected {MAGIC!r})")
    (length,) = struct.unpack(">I", start[4:])
    if length > MAX_HEADER_BYTES:
        raise WireError(f"a frame header of {length} bytes is over the limit of {MAX_HEADER_BYTES}")
    try:
        header = json.loads(_read_exactly(sock, length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WireError(f"a frame header is not UTF-8 JSON: {error}") from None
    if not isinstance(header, dict):
        raise WireError(f"a frame header must be a JSON object, got {type(header).__name__}")
    version = header.get("protocol")
    if version != PROTOCOL_VERSION:
        raise WireError(
            f"the other end speaks mailbox protocol {version!r}, this one {PROTOCOL_VERSION}: install the same"
            " lightning_parablock version on the site and where its SuperNode runs the ClientApp"
        )
    kind = header.get("kind")
    if not isinstance(kind, str):
        raise WireError(f"a frame header must name its kind, got {kind!r}")
    if kind == "refuse":
        raise MailboxRefused(str(header.get("reason", "refused without a reason")))
    if kinds is not None and kind not in kinds:
        raise WireError(f"expected a frame of kind {' or '.join(map(repr, kinds))}, got {kind!r}")
    listed = header.get("arrays", [])
    if not isinstance(listed, list) or not all(isinstance(entry, dict) for entry in listed):
        raise WireError(f"a frame's `arrays` must be a list of objects, got {listed!r}")
    names = set()
    for entry in listed:
        check_array(entry.get("name"), entry.get("dtype"), entry.get("shape"))
        if entry["name"] in names:
            raise WireError(f"a frame lists array {entry['name']!r} twice")
        names.add(entry["name"])
    total = sum(nbytes_of(e["dtype"], e["shape"]) for e in listed)
    if max_bytes is not None and total > max_bytes:
        raise WireError(f"a {kind!r} frame declares {total} bytes of arrays; at most {max_bytes} are taken here")
    arrays = [
        WireArray(e["name"], e["dtype"], tuple(e["shape"]), _read_exactly(sock, nbytes_of(e["dtype"], e["shape"])))
        for e in listed
    ]
    return Frame(header, arrays)


# ------------------------------------------------------------------------------------------------------ the key


def read_key(path: Union[str, os.PathLike]) -> bytes:
    """A site's mailbox key: :data:`KEY_BYTES` or more random bytes, written as hex in a file only the site (and the
    account its SuperNode runs as) may read."""
    try:
        text = open(path, encoding="ascii").read().strip()
    except OSError as error:
        raise WireError(f"cannot read the mailbox key file {os.fspath(path)!r}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise WireError(f"the mailbox key file {os.fspath(path)!r} is not hex text") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise WireError(f"the mailbox key file {os.fspath(path)!r} is not hex text") from None
    if len(key) < KEY_BYTES:
        raise WireError(f"the mailbox key in {os.fspath(path)!r} has {len(key)} bytes; it needs at least {KEY_BYTES}")
    return key


def new_nonce() -> str:
    return secrets.token_hex(16)


def prove(key: bytes, nonce: str) -> str:
    """The proof of holding ``key`` for one connection: an HMAC of its nonce (the key itself never travels)."""
    return hmac.new(key, f"parablock-mailbox/{PROTOCOL_VERSION}/{nonce}".encode(), hashlib.sha256).hexdigest()


def proof_matches(key: bytes, nonce: str, proof: Any) -> bool:
    return isinstance(proof, str) and hmac.compare_digest(prove(key, nonce), proof)


# ------------------------------------------------------------------------------------- the ClientApp's side


def call_site(
    socket_path: str,
    key: Union[bytes, str, os.PathLike],
    header: dict[str, Any],
    arrays: Sequence[WireArray],
    reply_timeout_s: float,
    silence_timeout_s: float = SILENCE_TIMEOUT_S,
    connect_timeout_s: float = 10.0,
) -> Frame:
    """Hand the server's message to the site's trainer and return its ``reply`` frame (the ClientApp's one job).

    ``key`` is the site's key, or its key file (read once the site listens: it writes the key first).

    Raises :class:`MailboxRefused` when the trainer refuses (its reason: a failed site, a wrong round), ``TimeoutError``
    when no reply came within ``reply_timeout_s`` or the trainer's process said nothing at all (not even a
    keep-alive) for ``silence_timeout_s``, ``ConnectionError`` when it cannot be reached or closes the connection (a
    site that died; a site that is not listening yet is retried for ``connect_timeout_s``), :class:`WireError` on
    a broken frame.
    """
    try:
        sock = _connect(socket_path, connect_timeout_s)
        try:
            _authenticate(sock, key if isinstance(key, bytes) else read_key(key))
            send_frame(sock, header, arrays)
            return _await_reply(sock, reply_timeout_s, silence_timeout_s)
        finally:
            sock.close()
    except ConnectionError:
        last_words = failure_note(socket_path)
        if last_words is not None:  # the site wrote why before it went: that is the answer
            raise MailboxRefused(last_words) from None
        raise


def failure_path(socket_path: Union[str, os.PathLike]) -> str:
    """Where a site that failed leaves its reason, beside its socket, for the ClientApps that come after it."""
    return os.fspath(socket_path) + ".failed"


def failure_note(socket_path: Union[str, os.PathLike]) -> Optional[str]:
    try:
        with open(failure_path(socket_path), encoding="utf-8") as note:
            return note.read().strip() or None
    except OSError:
        return None


def _authenticate(sock: socket.socket, key: bytes) -> None:
    """Prove holding the site's key for this connection (the site refuses a wrong one)."""
    challenge = read_frame(sock, ["challenge"], max_bytes=0)
    send_frame(sock, {"kind": "auth", "proof": prove(key, str(challenge.header.get("nonce")))})
    read_frame(sock, ["welcome"], max_bytes=0)


def _await_reply(sock: socket.socket, reply_timeout_s: float, silence_timeout_s: float) -> Frame:
    """The site's reply, keep-alives skipped; ``TimeoutError`` past the reply's deadline or a silence."""
    until = time.monotonic() + reply_timeout_s
    while True:
        left = until - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer from the site's trainer within {reply_timeout_s:.0f}s (comm_timeout)")
        sock.settimeout(min(left, silence_timeout_s))
        try:
            frame = read_frame(sock, ["keepalive", "reply"])
        except socket.timeout:
            if time.monotonic() < until:
                raise TimeoutError(
                    f"the site's trainer said nothing for {silence_timeout_s:.0f}s (not even a keep-alive)"
                ) from None
            continue
        if frame.kind == "reply":
            return frame


def _connect(socket_path: str, timeout_s: float) -> socket.socket:
    """A connection to the site's mailbox, retried until ``timeout_s`` while nobody listens there yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(1.0, timeout_s))
        try:
            sock.connect(socket_path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as error:
            sock.close()
            if time.monotonic() >= deadline or failure_note(socket_path) is not None:
                why = "no site listens on" if isinstance(error, FileNotFoundError) else "nobody answers on"
                raise ConnectionError(
                    f"{why} the mailbox {socket_path!r} (is the site's trainer running? it prints its mailbox)"
                ) from None
            time.sleep(0.5)
        except OSError as error:
            sock.close()
            raise ConnectionError(f"cannot reach the site's mailbox {socket_path!r}: {error}") from None


def wall_clock() -> float:
    """Seconds since the epoch: what processes on one machine (or with synchronized clocks) can compare."""
    return time.time()
