"""The ClientApp: a thin mailbox between the Flower server and a site's long-lived trainer.

A SuperNode starts one ClientApp process per message, so the trainer (model, optimizers, pending deltas, data,
checkpoints) cannot live here. Per message this hands what the server sent (the aggregate of an earlier round, or
the handshake, or a stop) to the site's trainer over its Unix socket and returns the trainer's reply (its clients'
uploads of the next round). The SuperNode names the socket and its key file with
``--node-config 'parablock-mailbox="/path/site.sock" parablock-key="/path/site.key"'``.

This module imports Flower and the standard library only (no torch, no lightning_parablock): it starts once per
message, and a site's SuperNode may run where the library is not installed at all.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from . import wire  # relative imports: the same files whether Flower loads the bundle or a test the library
from .records import to_content, to_frame

MAILBOX_KEY, KEY_FILE_KEY = "parablock-mailbox", "parablock-key"
ERROR_CODE = 1000
"""The code of the Error a mailbox replies with (the site failed, stopped answering or refused the message)."""

app = ClientApp()


def relay(message: Message, context: Context) -> Message:
    """Hand ``message`` to the site's trainer and return its reply, or an Error saying why there is none."""
    started = wire.wall_clock()
    config = context.node_config
    try:
        socket_path, key_file = str(config[MAILBOX_KEY]), str(config[KEY_FILE_KEY])
    except KeyError as missing:
        return _error(
            message,
            f"the SuperNode has no {missing.args[0]!r} in its --node-config; start it with --node-config"
            f' \'{MAILBOX_KEY}="/path/site.sock" {KEY_FILE_KEY}="/path/site.key"\' (the paths the site\'s trainer'
            " prints when it starts)",
        )
    try:
        header, arrays = to_frame(message.content)
        header["mailbox_started_at"] = started
        reply_timeout = float(header.get("reply_timeout_s", 600.0))
        connect_timeout = float(header.get("connect_timeout_s", 10.0))
        reply = wire.call_site(socket_path, key_file, header, arrays, reply_timeout, connect_timeout_s=connect_timeout)
    except (wire.MailboxRefused, wire.WireError, ConnectionError, TimeoutError, OSError) as error:
        return _error(message, f"{error} (mailbox {socket_path})")
    reply.header["mailbox"] = {"started_at": started, "replied_at": wire.wall_clock()}
    reply.header.pop("protocol", None)
    reply.header.pop("arrays", None)
    return Message(to_content(reply.header, reply.arrays), reply_to=message)


def _error(message: Message, reason: str) -> Message:
    return Message(Error(ERROR_CODE, reason), reply_to=message)


MESSAGE_TYPES = ("train.hello", "train.exchange", "train.final", "train.abort")
"""What the server sends: the handshake, a round's exchange, the last aggregate, a stop. All go to the trainer."""
for _message_type in MESSAGE_TYPES:
    app.train(_message_type.split(".")[1])(relay)
