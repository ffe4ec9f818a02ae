"""The mailbox between a site's trainer and its ClientApp, and the site's transport, without any Flower process.

A ClientApp is played by ``wire.call_site`` (what the real one calls) or by the ClientApp's own ``relay`` handler
given a Flower ``Message``; the site is a :class:`SiteMailbox` with a :class:`FlowerSiteTransport` on a thread.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from lightning_parablock.comm.codecs import Int8Codec, TopKCodec, as_encoded, encode_delta  # noqa: E402
from lightning_parablock.comm.transport import RoundUploads  # noqa: E402
from lightning_parablock.flower.app.parablock_app import wire  # noqa: E402
from lightning_parablock.flower.arrays import (  # noqa: E402
    aggregate_from_wire,
    aggregate_to_wire,
    tensor_to_wire,
    uploads_from_wire,
    uploads_to_wire,
    wire_to_tensor,
)
from lightning_parablock.flower.site_mailbox import FederationStopped, SiteMailbox  # noqa: E402
from lightning_parablock.flower.site_transport import FlowerSiteTransport  # noqa: E402

APP_DIR = Path(wire.__file__).parents[1]
LAYOUT = [("layer.weight", torch.Size([3, 4])), ("layer.bias", torch.Size([3]))]


@pytest.fixture
def short_dir():
    """A folder with a short path: a Unix socket's path has at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mailbox(short_dir):
    box = SiteMailbox(short_dir / "site.sock", short_dir / "site.key", site=1)
    yield box
    box.close()


def delta(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in LAYOUT}


def exchange_request(round_index: int, aggregate_round=None, block=0, **extra) -> dict:
    meta = None if aggregate_round is None else {"round": aggregate_round, "block": block, "kept": True}
    return {
        "kind": "exchange",
        "round": round_index,
        "aggregate": meta,
        "reply_timeout_s": 30,
        "connect_timeout_s": 1,
        **extra,
    }


def ask(box: SiteMailbox, header: dict, arrays=(), key: bytes | None = None, silence: float = 30.0) -> wire.Frame:
    return wire.call_site(str(box.socket_path), key or box.key, header, list(arrays), 30.0, silence)


def ask_later(box: SiteMailbox, header: dict, arrays=()) -> None:
    """A ClientApp on a thread of its own (what it gets back is not the test's business)."""

    def target():
        try:
            ask(box, header, arrays)
        except (wire.MailboxRefused, ConnectionError, OSError):
            pass

    threading.Thread(target=target, daemon=True).start()


def run_transport(box: SiteMailbox, round_index: int, deltas, weights, stop=None):
    """The site's comm thread: one exchange, its result (or exception) in a list when the thread ends."""
    transport = FlowerSiteTransport(box, lambda block: LAYOUT, "none", lambda: {})
    out: list = []

    def target():
        try:
            out.append(transport.exchange(RoundUploads(round_index, 0, deltas, weights), stop or threading.Event()))
        except BaseException as error:  # noqa: BLE001 - the test reads it
            out.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


# ------------------------------------------------------------------------------------------------------ frames


class _Pipe:
    """A connected pair of sockets: a frame sent on one is read from the other."""

    def __enter__(self):
        self.a, self.b = socket.socketpair()
        self.b.settimeout(5)
        return self

    def __exit__(self, *exc):
        self.a.close()
        self.b.close()


def test_a_frame_carries_its_header_and_arrays_byte_exact():
    arrays = [tensor_to_wire("a", torch.randn(2, 3)), tensor_to_wire("b", torch.randn(5).to(torch.bfloat16))]
    with _Pipe() as pipe:
        wire.send_frame(pipe.a, {"kind": "reply", "round": 3}, arrays)
        frame = wire.read_frame(pipe.b, ["reply"])
    assert frame.header["round"] == 3 and frame.header["protocol"] == wire.PROTOCOL_VERSION
    assert [bytes(a.data) for a in frame.arrays] == [bytes(a.data) for a in arrays]
    assert torch.equal(wire_to_tensor(frame.arrays[1]).float(), wire_to_tensor(arrays[1]).float())


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda raw: b"XXXX" + raw[4:], "not a parablock mailbox frame"),
        (lambda raw: raw.replace(b'"protocol": 1', b'"protocol": 9'), "protocol 9"),
        (lambda raw: raw.replace(b'"float32"', b'"object"'), "dtype 'object'"),
        (lambda raw: raw.replace(b"[2, 3]", b"[2, -3]"), "shape"),
    ],
    ids=["magic", "version", "dtype", "shape"],
)
def test_a_frame_that_breaks_the_protocol_is_refused(mutate, error):
    parts = wire.frame_parts({"kind": "reply"}, [tensor_to_wire("a", torch.zeros(2, 3))])
    raw = b"".join(bytes(p) for p in parts)
    header_length = int.from_bytes(raw[4:8], "big")
    broken = mutate(raw)
    broken = broken[:4] + (len(broken) - 8 - (len(raw) - 8 - header_length)).to_bytes(4, "big") + broken[8:]
    with _Pipe() as pipe:
        pipe.a.sendall(broken)
        with pytest.raises(wire.WireError, match=error):
            wire.read_frame(pipe.b)


def test_an_array_whose_bytes_do_not_fit_its_shape_is_refused():
    with pytest.raises(wire.WireError, match="should be 24 bytes, got 20"):
        wire.WireArray("a", "float32", (2, 3), b"\0" * 20)


# ------------------------------------------------------------------------------------------- the mailbox


def test_a_wrong_key_is_refused_and_the_key_file_is_private(mailbox, short_dir):
    assert os.stat(short_dir / "site.key").st_mode & 0o077 == 0
    with pytest.raises(wire.MailboxRefused, match="wrong mailbox key"):
        ask(mailbox, exchange_request(0), key=os.urandom(32))


def test_uploads_travel_byte_exact_and_the_aggregate_comes_back(mailbox):
    deltas = {3: delta(3), 5: delta(5)}
    thread, out = run_transport(mailbox, 0, deltas, {3: 1.0, 5: 2.0})
    reply = ask(mailbox, exchange_request(0))  # waits for the trainer's uploads of round 0
    assert reply.header["round"] == 0 and reply.header["weights"] == {"3": 1.0, "5": 2.0}
    sent = {a.name: a for a in uploads_to_wire({c: as_encoded(d) for c, d in deltas.items()})}
    assert {a.name: bytes(a.data) for a in reply.arrays} == {n: bytes(a.data) for n, a in sent.items()}
    got = uploads_from_wire(reply.arrays, [3, 5], "none", LAYOUT, "test")
    assert all(torch.equal(got[c][n], deltas[c][n]) for c in deltas for n in deltas[c])

    aggregate = delta(9)
    meta = {"round": 0, "block": 0, "kept": True, "skipped_clients": [5], "upload_bytes": {"3": 60, "5": 60}}
    ask_later(mailbox, exchange_request(1) | {"aggregate": meta}, aggregate_to_wire(aggregate))
    thread.join(10)
    result = out[0]
    assert not isinstance(result, BaseException), result
    assert all(torch.equal(result.aggregate[n], aggregate[n]) for n in aggregate)
    assert result.skipped_clients == [5] and result.upload_bytes == {3: 60, 5: 60}
    assert result.link_seconds > 0  # measured: uploads ready to aggregate back


def test_compressed_uploads_travel_as_encoded_and_decode_as_the_codec_does():
    for codec in (Int8Codec("block", 4), TopKCodec(0.25)):
        raw = delta(1)
        encoded = encode_delta(codec, raw, {})
        arrays = uploads_to_wire({2: encoded})
        assert sum(len(a.data) for a in arrays) == sum(e.nbytes for e in encoded.values())
        got = uploads_from_wire(arrays, [2], codec.name, LAYOUT, "test")[2]
        assert all(torch.equal(got[n], encoded[n].decode()) for n in raw)


def test_a_trainer_that_posts_nothing_in_time_times_the_clientapp_out(mailbox):
    with pytest.raises(TimeoutError, match="no answer from the site's trainer within 1s"):
        wire.call_site(str(mailbox.socket_path), mailbox.key, exchange_request(0), [], reply_timeout_s=1.0)


def test_the_clientapp_hears_keepalives_while_the_trainer_computes(mailbox, monkeypatch):
    monkeypatch.setattr("lightning_parablock.flower.site_mailbox.KEEPALIVE_S", 0.2)
    threading.Timer(1.5, lambda: mailbox.post_uploads(0, {"round": 0}, [])).start()
    started = time.monotonic()
    reply = ask(mailbox, exchange_request(0), silence=1.0)  # would time out without keep-alives
    assert reply.header["round"] == 0 and time.monotonic() - started >= 1.4


def test_a_silent_trainer_times_the_clientapp_out(short_dir):
    """A process that holds the socket but says nothing after the handshake: the ClientApp gives up."""
    path, key = short_dir / "quiet.sock", os.urandom(32)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def quiet():
        connection, _ = listener.accept()
        wire.send_frame(connection, {"kind": "challenge", "nonce": "n"})
        wire.read_frame(connection, ["auth"])
        wire.send_frame(connection, {"kind": "welcome"})
        wire.read_frame(connection, ["exchange"])
        time.sleep(3)
        connection.close()

    threading.Thread(target=quiet, daemon=True).start()
    try:
        with pytest.raises(TimeoutError, match="said nothing for 1s"):
            wire.call_site(str(path), key, exchange_request(0), [], reply_timeout_s=30.0, silence_timeout_s=1.0)
    finally:
        listener.close()


def test_stop_ends_the_transports_wait_without_an_aggregate(mailbox):
    stop = threading.Event()
    thread, out = run_transport(mailbox, 0, {1: delta(1)}, {1: 1.0}, stop)
    time.sleep(0.3)
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and out[0].aggregate is None


def test_the_servers_stop_reaches_a_waiting_transport_and_the_handshake(mailbox):
    thread, out = run_transport(mailbox, 0, {1: delta(1)}, {1: 1.0})
    ask(mailbox, {"kind": "abort", "reason": "site 0 failed in round 0: boom"})
    thread.join(5)
    assert isinstance(out[0], FederationStopped) and "site 0 failed in round 0" in str(out[0])
    with pytest.raises(FederationStopped, match="boom"):
        mailbox.wait_started(timeout_s=1)


def test_the_handshake_waits_for_the_first_exchange_and_times_out(mailbox):
    with pytest.raises(TimeoutError, match="sent this site nothing yet"):
        mailbox.wait_started(timeout_s=0.5)
    mailbox.publish_hello({"site": 1, "rounds": 3})
    assert ask(mailbox, {"kind": "hello"}).header["rounds"] == 3
    ask_later(mailbox, exchange_request(0))
    assert mailbox.wait_started(timeout_s=5).header["round"] == 0


def test_a_failed_site_refuses_every_clientapp_naming_why(mailbox):
    mailbox.fail("site 1 failed in round 2: RuntimeError: out of memory")
    with pytest.raises(wire.MailboxRefused, match="out of memory"):
        ask(mailbox, exchange_request(3))


@pytest.mark.parametrize(
    "arrays, error",
    [
        (lambda a: a[:1], "holds"),  # a parameter missing
        (lambda a: [wire.WireArray("other", "float32", (3,), bytes(12)), a[0]], "holds"),  # a wrong name
        (lambda a: [a[0], tensor_to_wire("layer.bias", torch.zeros(4))], "expected float32 \\[3\\]"),  # shape
        (lambda a: [a[0], tensor_to_wire("layer.bias", torch.zeros(3, dtype=torch.float64))], "float64"),  # dtype
    ],
    ids=["missing", "name", "shape", "dtype"],
)
def test_an_aggregate_of_a_wrong_name_shape_or_dtype_is_refused(arrays, error):
    good = aggregate_to_wire(delta(0))
    with pytest.raises(wire.WireError, match=error):
        aggregate_from_wire(arrays(good), LAYOUT, "the aggregate")


@pytest.mark.parametrize(
    "rename, error",
    [
        (lambda name: name.replace("2/", "7/"), "not from one of the clients"),
        (lambda name: name.replace("layer.weight", "layer.other"), "names no parameter"),
    ],
    ids=["client", "parameter"],
)
def test_uploads_of_a_wrong_client_or_parameter_are_refused(rename, error):
    arrays = [
        wire.WireArray(rename(a.name), a.dtype, a.shape, a.data) for a in uploads_to_wire({2: as_encoded(delta(2))})
    ]
    with pytest.raises(wire.WireError, match=error):
        uploads_from_wire(arrays, [2], "none", LAYOUT, "site 0's uploads")


def test_uploads_whose_payload_does_not_encode_the_parameter_are_refused():
    arrays = uploads_to_wire({2: as_encoded({"layer.weight": torch.zeros(4, 3), "layer.bias": torch.zeros(3)})})
    with pytest.raises(wire.WireError, match="do not encode a tensor of shape \\[3, 4\\]"):
        uploads_from_wire(arrays, [2], "none", LAYOUT, "site 0's uploads")
    bf16 = uploads_to_wire({2: as_encoded({n: t.to(torch.bfloat16) for n, t in delta(2).items()})})
    with pytest.raises(wire.WireError, match="the none codec sends float32"):
        uploads_from_wire(bf16, [2], "none", LAYOUT, "site 0's uploads")


# ------------------------------------------------------------------------------------------- the ClientApp


def test_the_clientapp_relays_a_flower_message_and_its_reply(mailbox):
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from lightning_parablock.flower.app.parablock_app.mailbox import relay
    from lightning_parablock.flower.app.parablock_app.records import to_content, to_frame

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    message = Message(to_content(exchange_request(0), []), 7, "train.exchange")
    message.metadata.__dict__["_message_id"] = message.object_id
    mailbox.post_uploads(0, {"round": 0, "site": 1}, uploads_to_wire({4: as_encoded(delta(4))}))
    config = {"parablock-mailbox": str(mailbox.socket_path), "parablock-key": str(mailbox.key_file)}
    context = Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})
    reply = relay(message, context)
    header, arrays = to_frame(reply.content)
    assert header["site"] == 1 and {a.name for a in arrays} == {"4/layer.weight/values", "4/layer.bias/values"}
    assert header["mailbox"]["replied_at"] >= header["mailbox"]["started_at"]

    unconfigured = relay(message, Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={}))
    assert unconfigured.has_error() and "parablock-mailbox" in unconfigured.error.reason
    mailbox.close()
    gone = relay(message, context)
    assert gone.has_error() and "no site listens" in gone.error.reason


def test_the_clientapp_waits_for_a_site_that_is_still_starting(short_dir):
    """The server's handshake may come before the site's trainer listens: the ClientApp retries its connection."""
    box: list[SiteMailbox] = []
    threading.Timer(1.5, lambda: box.append(SiteMailbox(short_dir / "late.sock", short_dir / "late.key", 0))).start()
    header = {"kind": "hello", "reply_timeout_s": 30}
    threading.Timer(2.5, lambda: box[0].publish_hello({"site": 0})).start()
    try:
        reply = wire.call_site(
            str(short_dir / "late.sock"), str(short_dir / "late.key"), header, [], 30, connect_timeout_s=20
        )
        assert reply.header["site"] == 0
    finally:
        for mailbox in box:
            mailbox.close()


def test_the_clientapp_module_imports_neither_torch_nor_the_library():
    """Flower starts the ClientApp once per message: it imports Flower and the standard library only."""
    probe = (
        "import sys; import parablock_app.mailbox as m; assert m.app is not None;"
        " bad = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'lightning_parablock', 'lightning'));"
        " print(json.dumps(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import json; " + probe],
        cwd=APP_DIR,
        env={**os.environ, "PYTHONPATH": str(APP_DIR)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_nothing_is_read_from_a_connection_before_it_proves_the_key(mailbox):
    """An `auth` frame declaring a terabyte of arrays is refused on its header, before any allocation."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(mailbox.socket_path))
    try:
        wire.read_frame(sock, ["challenge"])
        huge = json.dumps(
            {"protocol": 1, "kind": "auth", "arrays": [{"name": "x", "dtype": "uint8", "shape": [2**40]}]}
        )
        sock.sendall(wire.MAGIC + len(huge).to_bytes(4, "big") + huge.encode())
        assert sock.recv(1) == b""  # the site hung up
    finally:
        sock.close()
    assert ask(mailbox, {"kind": "abort", "reason": "still serving"}).header["stopped"]


def test_a_second_run_or_a_repeated_request_is_refused(mailbox):
    mailbox.publish_hello({"site": 1})
    mailbox.post_uploads(0, {"round": 0}, [])
    ask(mailbox, exchange_request(0))
    with pytest.raises(wire.MailboxRefused, match="sent its uploads of round 0 already"):
        ask(mailbox, exchange_request(0))
    with pytest.raises(wire.MailboxRefused, match="already in a federation's run"):
        ask(mailbox, {"kind": "hello"})


def test_a_failing_site_gives_the_waiting_clientapp_its_reason_before_closing(mailbox):
    answers: list = []

    def waiting_clientapp():
        try:
            ask(mailbox, exchange_request(0))
        except wire.MailboxRefused as refused:
            answers.append(str(refused))

    thread = threading.Thread(target=waiting_clientapp, daemon=True)
    thread.start()
    time.sleep(0.5)  # it waits for round 0's uploads
    mailbox.fail("site 1 failed in round 0: RuntimeError: boom")
    mailbox.close(drain_s=5)
    thread.join(5)
    assert answers == ["site 1 failed in round 0: RuntimeError: boom"]
    assert not mailbox.socket_path.exists()
