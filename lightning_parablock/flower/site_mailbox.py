"""The site's end of the mailbox: a Unix socket in the trainer's process that Flower's ClientApps talk to.

Flower starts a ClientApp per message; each connects here, proves it holds the site's key and hands over what the
server sent. The mailbox keeps what arrived (the handshake's verdict, each round's aggregate, a stop) for the
trainer's threads to pick up, and answers with what the trainer posted (its clients' uploads of the round the
server asks for), sending keep-alive frames while the trainer is still computing. The trainer never waits on a
ClientApp and a ClientApp never waits on anything but the trainer.

One connection is served at a time in practice (a SuperNode handles one message at a time); each runs on a thread
of its own, so a stuck ClientApp never blocks the next one.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lightning_parablock.files import write_text_atomic
from lightning_parablock.flower.app.parablock_app import wire

KEEPALIVE_S = 2.0
"""How often a waiting ClientApp hears from the trainer: it gives up after the server's silence timeout."""
_HANDSHAKE_S = 30.0
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, with its terminating NUL


class FederationStopped(RuntimeError):
    """The server stopped the federation (another site failed, or the handshake refused this one)."""


def federation_stop(error: BaseException) -> "FederationStopped | None":
    """The :class:`FederationStopped` that ``error`` is or came from, if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, FederationStopped):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@dataclass
class Delivery:
    """What one server message brought: its header, its arrays and when the mailbox had them (wall clock)."""

    header: dict[str, Any]
    arrays: list[wire.WireArray]
    received_at: float
    mailbox_started_at: Optional[float] = None


@dataclass
class _Posted:
    header: dict[str, Any]
    arrays: list[wire.WireArray]
    taken_at: Optional[float] = None


@dataclass
class _State:
    hello: Optional[dict[str, Any]] = None
    started: Optional[Delivery] = None  # the first exchange: the handshake's verdict
    aggregates: dict[int, Delivery] = field(default_factory=dict)  # by round
    final: Optional[Delivery] = None
    uploads: dict[int, _Posted] = field(default_factory=dict)  # by round
    finished: Optional[dict[str, Any]] = None  # the last reply's header (the run's last records)
    final_sent: bool = False
    stopped: Optional[str] = None  # the server's reason
    failed: Optional[str] = None  # this site's reason
    last_contact: Optional[tuple[float, str]] = None  # (wall clock, what) of the last server message
    serving: int = 0  # ClientApp connections being answered


class SiteMailbox:
    """Listens on ``socket_path`` for this site's ClientApps; the trainer's threads post and wait through it.

    Args:
        socket_path: the Unix socket to create (its folder must exist; a stale socket nobody listens on is replaced).
        key_file: the key a ClientApp must prove it holds; created (hex, mode 0600) when the file does not exist.
        site: this site's index, named in errors and in each reply.
    """

    def __init__(self, socket_path: os.PathLike | str, key_file: os.PathLike | str, site: int) -> None:
        self.socket_path = Path(socket_path)
        self.key_file = Path(key_file)
        self.site = site
        if len(os.fsencode(self.socket_path)) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"The mailbox socket path {str(self.socket_path)!r} is longer than {_MAX_SOCKET_PATH} bytes (a Unix"
                " socket's limit); choose a shorter one, e.g. under /tmp or /run."
            )
        if not self.socket_path.parent.is_dir():
            raise ValueError(f"The mailbox socket's folder {str(self.socket_path.parent)!r} does not exist.")
        self.key = _load_or_create_key(self.key_file)
        Path(wire.failure_path(self.socket_path)).unlink(missing_ok=True)  # a failed predecessor's note, ours
        self._state = _State()
        self._changed = threading.Condition()
        self._listener = _listen(self.socket_path)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"parablock-mailbox-{site}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------- the trainer's side

    def publish_hello(self, hello: dict[str, Any]) -> None:
        """What this site answers the server's handshake with (its settings, weights and round)."""
        self._update(hello=hello)

    def wait_started(self, timeout_s: float, stop: Optional[threading.Event] = None) -> Delivery:
        """Block until the server accepts the handshake (its first exchange arrives); raise if it refuses or stops."""
        return self._wait(lambda s: s.started, timeout_s, stop, "the Flower server's first message")

    def post_uploads(self, round_index: int, header: dict[str, Any], arrays: list[wire.WireArray]) -> None:
        """This site's uploads of ``round_index``, for the ClientApp of the server's request to take."""
        with self._changed:
            self._state.uploads[round_index] = _Posted(header, arrays)
            self._changed.notify_all()

    def wait_aggregate(
        self, round_index: int, timeout_s: Optional[float] = None, stop: Optional[threading.Event] = None
    ) -> Optional[Delivery]:
        """The server's delivery of round ``round_index``'s aggregate; ``None`` once ``stop`` is set."""

        def ready(state: _State) -> Optional[Delivery]:
            if round_index in state.aggregates:
                return state.aggregates.pop(round_index)
            if state.final is not None and (state.final.header.get("aggregate") or {}).get("round") == round_index:
                return state.final
            return None

        try:
            return self._wait(ready, timeout_s, stop, f"round {round_index}'s aggregate")
        except _Stopped:
            return None

    def finish(self, reply_header: dict[str, Any]) -> None:
        """The trainer is done: the final message's reply (the last records) may go."""
        self._update(finished=reply_header)

    def fail(self, reason: str) -> None:
        """This site failed: every waiting and later ClientApp tells the server why (the other sites are stopped);
        the reason is also left beside the socket for the ClientApps that come after this process."""
        try:
            write_text_atomic(wire.failure_path(self.socket_path), reason + "\n")
        except OSError:
            pass  # the waiting ClientApps still hear it
        with self._changed:
            if self._state.failed is None:
                self._state.failed = reason
            self._changed.notify_all()

    def wait_final_taken(self, timeout_s: float) -> bool:
        """Keep the mailbox open until the server's final message took this site's last records (``False``: it did
        not come within ``timeout_s``)."""
        try:
            self._wait(lambda s: s.final_sent or None, timeout_s, None, "final message from the server")
        except (TimeoutError, FederationStopped, _Stopped):
            return False
        return True

    @property
    def stopped(self) -> Optional[str]:
        """Why the server stopped the federation, once it did."""
        return self._state.stopped

    def describe_silence(self) -> str:
        """When the server last wrote, for a timeout's message."""
        contact = self._state.last_contact
        if contact is None:
            return (
                "The Flower server has sent this site nothing yet (is the SuperNode running, and `flwr run` started?)."
            )
        at, what = contact
        return f"The Flower server's last message to this site ({what}) came {wire.wall_clock() - at:.0f}s ago."

    def close(self, drain_s: float = 0.0) -> None:
        """Stop listening and remove the socket (the key file stays: the SuperNode's config names it).

        ``drain_s``: first let the ClientApps being answered have their answer (a failed site's refusal naming why)
        for up to this long; a process about to exit would otherwise take its reason with it.
        """
        if self._closed.is_set():
            return
        if drain_s > 0:
            try:
                self._wait(lambda s: s.serving == 0 or None, drain_s, None, "the last answer")
            except (TimeoutError, FederationStopped, _Stopped):
                pass
        self._closed.set()
        with self._changed:
            self._changed.notify_all()
        try:
            self._listener.close()
        finally:
            try:
                if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                    os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------------------------------- waiting

    def _update(self, **values: Any) -> None:
        with self._changed:
            for name, value in values.items():
                setattr(self._state, name, value)
            self._changed.notify_all()

    def _wait(
        self,
        ready: Callable[[_State], Any],
        timeout_s: Optional[float],
        stop: Optional[threading.Event],
        what: str,
    ) -> Any:
        deadline = None if timeout_s is None else wire.wall_clock() + timeout_s
        with self._changed:
            while True:
                found = ready(self._state)
                if found is not None:
                    return found
                if self._state.stopped is not None:
                    raise FederationStopped(self._state.stopped)
                if (stop is not None and stop.is_set()) or self._closed.is_set():
                    raise _Stopped()
                left = None if deadline is None else deadline - wire.wall_clock()
                if left is not None and left <= 0:
                    raise TimeoutError(f"No {what} within {timeout_s:.0f}s. {self.describe_silence()}")
                self._changed.wait(timeout=0.5 if left is None else min(left, 0.5))

    # --------------------------------------------------------------------------------------- ClientApps

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(connection,), name="parablock-mailbox-conn", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with self._changed:
            self._state.serving += 1
        with connection:
            try:
                connection.settimeout(_HANDSHAKE_S)
                nonce = wire.new_nonce()
                wire.send_frame(connection, {"kind": "challenge", "nonce": nonce, "site": self.site})
                auth = wire.read_frame(connection, ["auth"], max_bytes=0)  # nothing is read before the proof
                if not wire.proof_matches(self.key, nonce, auth.header.get("proof")):
                    wire.send_frame(connection, _refusal(f"site {self.site}: wrong mailbox key (check parablock-key)"))
                    return
                wire.send_frame(connection, {"kind": "welcome"})
                request = wire.read_frame(connection, ["hello", "exchange", "final", "abort"])
                received = Delivery(
                    request.header, request.arrays, wire.wall_clock(), request.header.get("mailbox_started_at")
                )
                reply = self._answer(connection, received)
                wire.send_frame(connection, *reply)
                if request.kind == "final" and reply[0]["kind"] == "reply":
                    self._update(final_sent=True)
            except (OSError, wire.WireError, wire.MailboxRefused):
                pass  # the ClientApp went away or spoke nonsense: it reports to the server itself
        with self._changed:
            self._state.serving -= 1
            self._changed.notify_all()

    def _answer(self, connection: socket.socket, request: Delivery) -> tuple[dict[str, Any], list[wire.WireArray]]:
        header = request.header
        kind = header["kind"]
        with self._changed:
            self._state.last_contact = (request.received_at, f"{kind} of round {header.get('round')}")
            if self._state.failed is not None:
                return _refusal(self._state.failed), []
            if kind == "abort":
                self._state.stopped = str(header.get("reason", "the server stopped the federation"))
                self._changed.notify_all()
                return {"kind": "reply", "site": self.site, "stopped": True}, []
            if kind == "hello":
                if self._state.started is not None:
                    return _refusal(
                        f"site {self.site} is already in a federation's run (it started at round"
                        f" {self._state.started.header.get('round')}): restart its trainer to join a new run"
                    ), []
                return self._hold(connection, lambda s: s.hello and ({"kind": "reply", **s.hello}, []))
            round_index = header.get("round")
            if not isinstance(round_index, int):
                return _refusal(f"site {self.site}: a {kind} message without a round"), []
            posted = self._state.uploads.get(round_index)
            if kind == "exchange" and posted is not None and posted.taken_at is not None:
                return _refusal(f"site {self.site} sent its uploads of round {round_index} already"), []
            if kind == "exchange" and self._state.started is None:
                self._state.started = request
            aggregate = header.get("aggregate")
            if kind == "final":
                self._state.final = request
            elif aggregate is not None:
                self._state.aggregates[int(aggregate["round"])] = request
            self._changed.notify_all()
            if kind == "final":
                return self._hold(connection, lambda s: s.finished and ({"kind": "reply", **s.finished}, []))
            return self._hold(connection, lambda s: self._take_uploads(s, round_index))

    @staticmethod
    def _take_uploads(state: _State, round_index: int) -> Optional[tuple[dict[str, Any], list[wire.WireArray]]]:
        posted = state.uploads.get(round_index)
        if posted is None:
            return None
        posted.taken_at = wire.wall_clock()
        reply = {"kind": "reply", **posted.header, "taken_at": posted.taken_at}
        arrays, posted.arrays = posted.arrays, []  # sent once: the memory goes with it
        return reply, arrays

    def _hold(
        self, connection: socket.socket, ready: Callable[[_State], Any]
    ) -> tuple[dict[str, Any], list[wire.WireArray]]:
        """Wait (holding the state's lock only between checks) until ``ready`` gives the reply, sending keep-alives.

        ``ready`` may take what it returns (uploads are sent once): it is called once per check.
        """
        last_sign = time.monotonic()
        while True:
            found = ready(self._state)
            if found:
                return found
            if self._state.failed is not None:
                return _refusal(self._state.failed), []
            if self._state.stopped is not None or self._closed.is_set():
                return _refusal(f"site {self.site} is shutting down"), []
            if time.monotonic() - last_sign >= KEEPALIVE_S:
                self._changed.release()
                try:
                    wire.send_frame(connection, {"kind": "keepalive"})
                finally:
                    self._changed.acquire()
                last_sign = time.monotonic()
            self._changed.wait(timeout=KEEPALIVE_S)


class _Stopped(Exception):
    """The waiting thread was told to stop (shutdown), not a failure."""


def _refusal(reason: str) -> dict[str, Any]:
    return {"kind": "refuse", "reason": reason}


def _load_or_create_key(path: Path) -> bytes:
    """The site's key from ``path``, or a new random one written there (mode 0600, never over an existing file)."""
    if path.exists():
        return wire.read_key(path)
    key = secrets.token_bytes(wire.KEY_BYTES)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        raise ValueError(f"Cannot create the mailbox key file {str(path)!r}: {error.strerror}.") from None
    with os.fdopen(descriptor, "w") as stream:
        stream.write(key.hex() + "\n")
    return key


def _listen(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``; a stale socket (nobody listening) is replaced, anything else refused."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ValueError(f"The mailbox path {str(path)!r} exists and is not a socket; choose another path.")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left by a site that died: nobody answers on it
        else:
            raise ValueError(f"Another process listens on the mailbox {str(path)!r}: is this site already running?")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o660)  # the site's account and group: a SuperNode run as another account joins the group
    listener.listen(8)
    return listener
