"""IMAP in depth on Dovecot: after-delivery actions, UIDVALIDITY changes, \\Seen set by others,
non-ASCII and vanished folders, and a 10,000-message mailbox."""

from __future__ import annotations

import asyncio
import imaplib
import ssl
from pathlib import Path
from typing import Any

import pytest

from fetchd.errors import TemporaryError
from tests.conftest import ConfigWriter, as_delivered, strip_received
from tests.support.dovecot import Dovecot
from tests.support.sink import Sink
from tests.test_interop import poll_once


def imap_account(
    configs: ConfigWriter, dovecot: Dovecot, user: str, port: int, **extra: Any
) -> Path:
    return configs.write(
        [configs.account(dovecot, user, protocol="imap", mode="implicit", sink_port=port, **extra)]
    )


def flags(dovecot: Dovecot, user: str, folder: str = "INBOX") -> list[str]:
    out = dovecot.doveadm("fetch", "-u", user, "flags", "mailbox", folder)
    return [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("flags:")]


@pytest.mark.parametrize("action", ["delete", "seen", "move", "leave"])
async def test_after_delivery_actions(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter, action: str
) -> None:
    dovecot.add_folder(mailbox_user, "Archive")
    dovecot.deliver(mailbox_user, [b"Subject: one\n\n1\n", b"Subject: two\n\n2\n"])
    extra: dict[str, Any] = {"after_delivery": action}
    if action == "move":
        extra["move_to"] = "Archive"
    config = imap_account(configs, dovecot, mailbox_user, sink.port, **extra)
    (first,) = await poll_once(config)
    (second,) = await poll_once(config)
    assert first.ok and second.ok, (first.line(), second.line())
    assert len(sink.accepted) == 2, "delivered once whatever happens to them afterwards"
    inbox = dovecot.count(mailbox_user)
    if action == "delete":
        assert inbox == 0
    elif action == "move":
        assert inbox == 0 and dovecot.count(mailbox_user, "Archive") == 2
    elif action == "seen":
        assert inbox == 2 and all("\\Seen" in f for f in flags(dovecot, mailbox_user))
    else:
        assert inbox == 2 and not any("\\Seen" in f for f in flags(dovecot, mailbox_user))


async def test_seen_set_by_another_client_is_still_fetched(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter, ca_file: Path
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: read elsewhere\n\nbody\n"])
    ctx = ssl.create_default_context(cafile=str(ca_file))
    other = imaplib.IMAP4_SSL("localhost", dovecot.ports["imaps"], ssl_context=ctx)
    other.login(mailbox_user, dovecot.users[mailbox_user])
    other.select("INBOX")
    other.store("1", "+FLAGS", "(\\Seen)")
    other.logout()
    (outcome,) = await poll_once(imap_account(configs, dovecot, mailbox_user, sink.port))
    assert outcome.ok and len(sink.accepted) == 1


def reset_uidvalidity(dovecot: Dovecot, user: str) -> None:
    """What a rebuilt server does: the folder gets a new UIDVALIDITY."""
    out = dovecot.doveadm("mailbox", "status", "-u", user, "uidvalidity", "INBOX")
    current = int(out.split("=")[1])
    dovecot.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(current + 7), "INBOX")


@pytest.mark.parametrize("policy", ["refetch", "rebaseline"])
async def test_uidvalidity_change(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter, policy: str
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: a\n\na\n", b"Subject: b\n\nb\n"])
    config = imap_account(
        configs, dovecot, mailbox_user, sink.port, keep=True, uidvalidity_change=policy
    )
    (outcome,) = await poll_once(config)
    assert outcome.ok and len(sink.accepted) == 2
    reset_uidvalidity(dovecot, mailbox_user)
    dovecot.save(mailbox_user, b"Subject: c\r\n\r\nc\r\n")
    (outcome,) = await poll_once(config)
    assert outcome.ok, outcome.line()
    subjects = [strip_received(a.data)[1].split(b"\r\n")[0] for a in sink.accepted]
    if policy == "refetch":
        assert subjects == [b"Subject: a", b"Subject: b", b"Subject: c"], "known digests skipped"
    else:
        assert subjects == [b"Subject: a", b"Subject: b"], "everything present counts as seen"
    assert dovecot.count(mailbox_user) == 3
    (outcome,) = await poll_once(config)
    assert outcome.ok and len(sink.accepted) == len(subjects)


async def test_uidvalidity_change_deletes_nothing_in_that_poll(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: a\n\na\n"])
    keep = imap_account(configs, dovecot, mailbox_user, sink.port, keep=True)
    await poll_once(keep)
    reset_uidvalidity(dovecot, mailbox_user)
    delete = imap_account(configs, dovecot, mailbox_user, sink.port)
    (outcome,) = await poll_once(delete)
    assert outcome.ok and dovecot.count(mailbox_user) == 1, "held back while UIDs are in doubt"
    (outcome,) = await poll_once(delete)
    assert outcome.ok and dovecot.count(mailbox_user) == 0
    assert len(sink.accepted) == 1


async def test_non_ascii_folder_and_a_vanished_one(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter
) -> None:
    folder = "Résumé & Co ☃"
    dovecot.doveadm("mailbox", "create", "-u", mailbox_user, folder)
    dovecot.save(mailbox_user, b"Subject: in the odd folder\r\n\r\nbody\r\n", folder=folder)
    dovecot.deliver(mailbox_user, [b"Subject: inbox\n\nbody\n"])
    config = imap_account(
        configs, dovecot, mailbox_user, sink.port, folders=["INBOX", "Gone", folder]
    )
    (outcome,) = await poll_once(config)
    assert isinstance(outcome.error, TemporaryError)
    assert "'Gone'" in str(outcome.error) and "still exist" in str(outcome.error)
    assert len(sink.accepted) == 2, "the other folders went on"
    assert dovecot.count(mailbox_user, folder) == 0


async def test_ten_thousand_messages(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter
) -> None:
    messages = [
        b"Message-ID: <%d@ten.test>\nSubject: %d\n\nbody %d\n" % (i, i, i) for i in range(10_000)
    ]
    dovecot.deliver(mailbox_user, messages)
    config = imap_account(configs, dovecot, mailbox_user, sink.port)
    (outcome,) = await asyncio.wait_for(poll_once(config), 600)
    assert outcome.ok, outcome.line()
    assert len(sink.accepted) == 10_000 and dovecot.count(mailbox_user) == 0
    bodies = {strip_received(a.data)[1] for a in sink.accepted}
    assert all(as_delivered(m) in bodies for m in messages[::101])


async def test_a_tls_handshake_slower_than_a_second_is_waited_for(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter
) -> None:
    """A busy server (1,000 logins at once) takes a while to answer the TLS handshake; that is
    not a closed connection."""
    dovecot.deliver(mailbox_user, [b"Subject: slow handshake\n\nbody\n"])

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
        first = True
        while data := await src.read(65536):
            if first and delay:
                await asyncio.sleep(delay)  # hold back the server's first TLS record
                first = False
            dst.write(data)
            await dst.drain()
        dst.close()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", dovecot.ports["imaps"])
        await asyncio.gather(pipe(reader, up_w, 0), pipe(up_r, writer, 2.5))

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    account = configs.account(
        dovecot, mailbox_user, protocol="imap", mode="implicit", sink_port=sink.port
    )
    account["port"] = server.sockets[0].getsockname()[1]
    try:
        (outcome,) = await poll_once(configs.write([account]))
    finally:
        server.close()
    assert outcome.ok, outcome.line()
    assert len(sink.accepted) == 1
