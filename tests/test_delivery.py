"""Delivery targets and the reply policy, end to end: Dovecot as the source, sinks that answer
what each case needs, an MDA script, and Dovecot's own LMTP service."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fetchd.config import load, state_file_of
from fetchd.deliver import _Protocol
from fetchd.errors import DeliveryDeferred, DeliveryUncertain
from fetchd.state import release
from fetchd.supervisor import Outcome
from tests.conftest import ConfigWriter, as_delivered, corpus_messages, strip_received
from tests.support.dovecot import Dovecot
from tests.support.sink import smtp_sink
from tests.test_interop import poll_once


def account(configs: ConfigWriter, dovecot: Dovecot, user: str, **deliver: Any) -> Path:
    acc = configs.account(dovecot, user, protocol="pop3", mode="implicit", sink_port=0)
    acc["deliver"] = deliver
    return configs.write([acc])


async def test_partial_acceptance_retries_only_the_pending_recipient(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: two recipients\n\nbody\n"])
    async with smtp_sink(replies={"b@localhost": "452 4.2.2 mailbox full"}) as sink:
        config = account(
            configs,
            dovecot,
            mailbox_user,
            smtp=f"127.0.0.1:{sink.port}",
            to=["a@localhost", "b@localhost"],
        )
        (outcome,) = await poll_once(config)
        assert isinstance(outcome.error, DeliveryDeferred) and "452" in str(outcome.error)
        assert [a.rcpt_tos for a in sink.accepted] == [("a@localhost",)]
        assert dovecot.count(mailbox_user) == 1, "not delivered to everyone: kept"

        sink.replies.clear()
        (outcome,) = await poll_once(config)
        assert outcome.ok, outcome.line()
        assert [a.rcpt_tos for a in sink.accepted] == [("a@localhost",), ("b@localhost",)]
    assert dovecot.count(mailbox_user) == 0


@pytest.mark.parametrize(
    ("policy", "left", "delivered_to"),
    [
        ({}, 1, []),
        ({"on_reject": {"554": "delete"}}, 0, []),
        (
            {"on_reject": {"default": "redirect"}, "quarantine": "quarantine@localhost"},
            0,
            ["quarantine@localhost"],
        ),
    ],
)
async def test_permanent_refusal_policy(
    dovecot: Dovecot,
    mailbox_user: str,
    configs: ConfigWriter,
    policy: dict[str, Any],
    left: int,
    delivered_to: list[str],
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: spam\n\nbuy now\n"])
    async with smtp_sink(
        replies={f"{mailbox_user}@localhost": "554 5.7.1 rejected as spam"}
    ) as sink:
        config = account(
            configs,
            dovecot,
            mailbox_user,
            smtp=f"127.0.0.1:{sink.port}",
            to=[f"{mailbox_user}@localhost"],
            **policy,
        )
        (first,) = await poll_once(config)
        (second,) = await poll_once(config)
    assert first.ok and second.ok, (first.line(), second.line())
    assert dovecot.count(mailbox_user) == left
    assert [r for a in sink.accepted for r in a.rcpt_tos] == delivered_to
    if not policy:
        assert first.result is not None and first.result.rejected == 1
        assert second.result is not None and second.result.fetched == 0, (
            "a kept refusal is not fetched again"
        )


async def test_unix_socket_and_batch_limit(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter, tmp_path: Path
) -> None:
    dovecot.deliver(mailbox_user, [f"Subject: {i}\n\nbody {i}\n".encode() for i in range(5)])
    path = str(tmp_path / "smtp.sock")
    async with smtp_sink(unix_path=path) as sink:
        config = account(
            configs, dovecot, mailbox_user, smtp=path, to=["u@localhost"], batch_limit=2
        )
        (outcome,) = await poll_once(config)
    assert outcome.ok, outcome.line()
    assert len(sink.accepted) == 5
    assert sink.connections == 3, "batch_limit 2: a new connection every two messages"


async def test_lmtp_per_recipient_replies(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: lmtp\n\nbody\n"])
    async with smtp_sink(
        lmtp=True, replies={"full@localhost": "452 4.2.2 full@localhost over quota"}
    ) as sink:
        config = account(
            configs,
            dovecot,
            mailbox_user,
            lmtp=f"127.0.0.1:{sink.port}",
            to=["ok@localhost", "full@localhost", "other@localhost"],
        )
        (outcome,) = await poll_once(config)
        assert isinstance(outcome.error, DeliveryDeferred), outcome.line()
        assert sorted(r for a in sink.accepted for r in a.rcpt_tos) == [
            "ok@localhost",
            "other@localhost",
        ]
        assert dovecot.count(mailbox_user) == 1
        sink.replies.clear()
        (outcome,) = await poll_once(config)
        assert outcome.ok, outcome.line()
    assert sorted(r for a in sink.accepted for r in a.rcpt_tos) == [
        "full@localhost",
        "ok@localhost",
        "other@localhost",
    ]
    assert dovecot.count(mailbox_user) == 0


def write_mda(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "mda.py"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.parametrize(
    ("status", "left", "kind"), [(0, 0, None), (75, 1, DeliveryDeferred), (1, 1, None)]
)
async def test_mda_exit_status(
    dovecot: Dovecot,
    mailbox_user: str,
    configs: ConfigWriter,
    tmp_path: Path,
    status: int,
    left: int,
    kind: type | None,
) -> None:
    message = corpus_messages()["rubymail-err-encoding-madness.eml"]
    dovecot.deliver(mailbox_user, [message])
    out = tmp_path / "out"
    out.mkdir()
    mda = write_mda(
        tmp_path,
        f"""
        import sys
        data = sys.stdin.buffer.read()
        open({str(out)!r} + "/" + sys.argv[1] + ".eml", "wb").write(data)
        open({str(out)!r} + "/args", "w").write(repr(sys.argv[1:]))
        sys.exit({status})
        """,
    )
    config = account(
        configs,
        dovecot,
        mailbox_user,
        mda=[str(mda), "%T", "from=%F; 100%%"],
        to=["a@localhost", "b; rm -rf /"][:1],
    )
    (outcome,) = await poll_once(config)
    assert dovecot.count(mailbox_user) == left
    if kind is not None:
        assert isinstance(outcome.error, kind)
    data = (out / "a@localhost.eml").read_bytes()
    assert b"\r\n" not in data, "an MDA gets LF line ends"
    assert strip_received(data.replace(b"\n", b"\r\n"))[1] == as_delivered(message)
    assert (out / "args").read_text().startswith("['a@localhost', 'from=")
    assert (out / "args").read_text().endswith("; 100%']")
    if status == 1:
        assert outcome.result is not None and outcome.result.rejected == 1


async def test_multidrop_takes_local_recipients_from_the_envelope_header(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter
) -> None:
    dovecot.deliver(
        mailbox_user,
        [
            b"Delivered-To: sales@example.com\nTo: someone@else.example\nSubject: one\n\nbody\n",
            b"Delivered-To: bob@example.com\nDelivered-To: spam@elsewhere.example\n"
            b"Subject: two\n\nbody\n",
            b"To: carol@example.com\nSubject: three\n\nno envelope header\n",
        ],
    )
    async with smtp_sink() as sink:
        config = account(
            configs,
            dovecot,
            mailbox_user,
            smtp=f"127.0.0.1:{sink.port}",
            multidrop={
                "header": "Delivered-To",
                "local_domains": ["example.com"],
                "map": {"sales": "team@localhost"},
                "fallback": "postmaster@localhost",
            },
        )
        (outcome,) = await poll_once(config)
    assert outcome.ok, outcome.line()
    got = {strip_received(a.data)[1].split(b"Subject: ")[1][:3]: a.rcpt_tos for a in sink.accepted}
    assert got == {
        b"one": ("team@localhost",),
        b"two": ("bob@example.com",),
        b"thr": ("postmaster@localhost",),
    }


async def test_multidrop_without_a_recipient_keeps_the_message(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter
) -> None:
    dovecot.deliver(mailbox_user, [b"Delivered-To: x@foreign.example\nSubject: s\n\nbody\n"])
    async with smtp_sink() as sink:
        config = account(
            configs,
            dovecot,
            mailbox_user,
            smtp=f"127.0.0.1:{sink.port}",
            multidrop={"header": "Delivered-To", "local_domains": ["example.com"]},
        )
        (outcome,) = await poll_once(config)
    assert outcome.result is not None and outcome.result.rejected == 1
    assert sink.accepted == [] and dovecot.count(mailbox_user) == 1


async def test_configured_sender_and_no_received_header(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter
) -> None:
    original = b"Return-Path: <a@b.example>\nSubject: s\n\nbody\n"
    dovecot.deliver(mailbox_user, [original])
    async with smtp_sink() as sink:
        config = account(
            configs,
            dovecot,
            mailbox_user,
            smtp=f"127.0.0.1:{sink.port}",
            to=["u@localhost"],
            sender="fetchd@localhost",
            received_header=False,
        )
        (outcome,) = await poll_once(config)
    assert outcome.ok
    (accepted,) = sink.accepted
    assert accepted.mail_from == "fetchd@localhost"
    assert accepted.data == as_delivered(original)


async def test_dovecot_lmtp_interop_multi_recipient(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter
) -> None:
    if "lmtp" not in dovecot.ports:
        pytest.fail("the test Dovecot has no LMTP listener (is dovecot-lmtpd installed?)")
    targets = [f"{mailbox_user}x", f"{mailbox_user}y"]
    for user in targets:
        dovecot.add_user(user, "unused")
    messages = list(corpus_messages().values())[:8]
    dovecot.deliver(mailbox_user, messages)
    config = account(
        configs, dovecot, mailbox_user, lmtp=f"127.0.0.1:{dovecot.ports['lmtp']}", to=targets
    )
    (outcome,) = await poll_once(config)
    assert outcome.ok, outcome.line()
    assert dovecot.count(mailbox_user) == 0
    for user in targets:
        assert dovecot.count(user) == len(messages)


async def test_corpus_through_a_real_postfix_arrives_intact(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter
) -> None:
    import re

    from tests.support.postfix import available, running_postfix

    if (why := available()) is not None:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    messages = {n: m for n, m in corpus_messages().items() if b"\x00" not in m}
    utf8 = "Return-Path: <ünï@exämple.org>\nSubject: SMTPUTF8\n\nbody\n".encode()
    messages["utf8"] = utf8
    dovecot.deliver(mailbox_user, messages.values())
    async with smtp_sink() as sink:
        with running_postfix(sink.port) as port:
            config = account(
                configs,
                dovecot,
                mailbox_user,
                smtp=f"127.0.0.1:{port}",
                to=["üser@example.org", "plain@example.org"][1:],
            )
            (outcome,) = await poll_once(config)
            assert outcome.ok, outcome.line()
            async with asyncio.timeout(60):
                await sink.wait_for(len(messages))
    assert dovecot.count(mailbox_user) == 0
    got = set()
    for accepted in sink.accepted:
        m = re.match(rb"Received: [^\r\n]*(?:\r\n[ \t][^\r\n]*)*\r\n", accepted.data)
        assert m and b"(Postfix)" in m.group(0), accepted.data[:300]
        got.add(strip_received(accepted.data[m.end() :])[1])
        if any(b > 127 for b in accepted.data):
            assert "BODY=8BITMIME" in accepted.mail_options, "8BITMIME was passed on"
    (relayed,) = [a for a in sink.accepted if a.data.endswith(b"Subject: SMTPUTF8\r\n\r\nbody\r\n")]
    assert relayed.mail_from == "ünï@exämple.org" and "SMTPUTF8" in relayed.mail_options
    for name, original in messages.items():
        expected = as_delivered(original)
        if re.match(rb"[!-9;-~]+:", expected):
            assert expected in got, f"{name} changed on its way through Postfix"
        else:  # no header on the first line (an mbox "From " line, blanks): Postfix adds its own
            assert any(expected[200:] in g for g in got), f"{name} lost its content in Postfix"


@pytest.mark.parametrize("target", ["lmtp", "mda"])
async def test_every_corpus_message_arrives_byte_exact_through_lmtp_and_mda(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter, tmp_path: Path, target: str
) -> None:
    messages = corpus_messages()
    dovecot.deliver(mailbox_user, messages.values())
    out = tmp_path / "out"
    out.mkdir()
    async with smtp_sink(lmtp=True) as sink:
        if target == "lmtp":
            deliver: dict[str, Any] = {"lmtp": f"127.0.0.1:{sink.port}"}
        else:
            mda = write_mda(
                tmp_path,
                f"""
                import sys, uuid
                open({str(out)!r} + "/" + uuid.uuid4().hex, "wb").write(sys.stdin.buffer.read())
                """,
            )
            deliver = {"mda": [str(mda)]}
        config = account(configs, dovecot, mailbox_user, to=["u@localhost"], **deliver)
        (outcome,) = await poll_once(config)
    assert outcome.ok, outcome.line()
    if target == "lmtp":
        got = {strip_received(a.data)[1] for a in sink.accepted}
    else:  # an MDA gets LF line ends: compare in CRLF form
        got = {strip_received(p.read_bytes().replace(b"\n", b"\r\n"))[1] for p in out.iterdir()}
    for name, original in messages.items():
        assert as_delivered(original) in got, f"{name} did not arrive byte for byte"
    assert dovecot.count(mailbox_user) == 0


@pytest.mark.parametrize(("delay", "reply_timeout", "delivered"), [(1.5, 5, True), (3, 1, False)])
async def test_slow_final_reply(
    dovecot: Dovecot,
    mailbox_user: str,
    configs: ConfigWriter,
    delay: float,
    reply_timeout: float,
    delivered: bool,
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: slow filter\n\nbody\n"])
    async with smtp_sink(delay=delay) as sink:
        config = account(
            configs,
            dovecot,
            mailbox_user,
            smtp=f"127.0.0.1:{sink.port}",
            to=["u@localhost"],
            timeout=reply_timeout,
        )
        (outcome,) = await poll_once(config)
    assert outcome.ok is delivered, outcome.line()
    assert dovecot.count(mailbox_user) == (0 if delivered else 1), (
        "an unknown outcome keeps the message"
    )


async def poll_into(
    configs: ConfigWriter,
    dovecot: Dovecot,
    user: str,
    mta: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    to: tuple[str, ...] = ("u@localhost",),
    limit: int = 1 << 16,
    **deliver: Any,
) -> Outcome:
    """One poll delivering to the scripted MTA ``mta``, whose reader buffers ``limit``."""
    server = await asyncio.start_server(mta, "127.0.0.1", 0, limit=limit)
    port = server.sockets[0].getsockname()[1]
    try:
        smtp = f"127.0.0.1:{port}"
        config = account(configs, dovecot, user, smtp=smtp, to=list(to), **deliver)
        (outcome,) = await asyncio.wait_for(poll_once(config), 60)
    finally:
        server.close()
    return outcome


async def poll_through_mta(
    configs: ConfigWriter,
    dovecot: Dovecot,
    user: str,
    on_data: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]],
    **deliver: Any,
) -> Outcome:
    """One poll into a scripted MTA that accepts the envelope; after its 354 to DATA,
    ``on_data`` has the line, and ends the session by returning False."""

    async def mta(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mta.test ESMTP\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"DATA"):
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                if not await on_data(reader, writer):
                    return
            else:
                ehlo = line.upper().startswith(b"EHLO")
                writer.write(b"250-mta.test\r\n250 8BITMIME\r\n" if ehlo else b"250 ok\r\n")
            await writer.drain()

    return await poll_into(configs, dovecot, user, mta, **deliver)


async def test_connection_dropped_mid_data_keeps_the_message(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: cut\n\n" + b"a long line of text\n" * 5000])

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await reader.read(1000)  # a little of the message, then the line drops
        writer.transport.abort()
        return False

    outcome = await poll_through_mta(configs, dovecot, mailbox_user, drop)
    assert isinstance(outcome.error, DeliveryDeferred), outcome.line()
    assert dovecot.count(mailbox_user) == 1


async def test_mta_that_stops_reading_mid_message_times_out_and_keeps_it(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter
) -> None:
    """The message is sent in slices under flow control; an MTA that stops reading fills the
    socket, and the reply timeout still ends the wait."""
    dovecot.deliver(mailbox_user, [b"Subject: small\n\nfirst\n"])
    dovecot.deliver(mailbox_user, [b"Subject: big\n\n" + (b"y" * 998 + b"\n") * 16000])
    taken = 0

    async def stall_on_the_second(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        nonlocal taken
        if taken:  # read nothing more, hold the line
            await asyncio.sleep(30)
            return False
        await reader.readuntil(b"\r\n.\r\n")
        taken += 1
        writer.write(b"250 queued\r\n")
        return True

    outcome = await poll_through_mta(configs, dovecot, mailbox_user, stall_on_the_second, timeout=2)
    assert isinstance(outcome.error, DeliveryDeferred), outcome.line()
    assert not isinstance(outcome.error, DeliveryUncertain), "the final dot was never sent"
    assert "timed out sending the message" in outcome.line()
    assert dovecot.count(mailbox_user) == 1, "the first is delivered and deleted, not the second"


async def _silent_after_the_dot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An MTA that reads the whole message, final dot included, then drops the line unanswered."""
    writer.write(b"220 mta.test ESMTP\r\n")
    while line := await reader.readline():
        if line.upper().startswith(b"DATA"):
            writer.write(b"354 go ahead\r\n")
            await writer.drain()
            await reader.readuntil(b"\r\n.\r\n")
            writer.transport.abort()
            return
        ehlo = line.upper().startswith(b"EHLO")
        writer.write(b"250-mta.test\r\n250 8BITMIME\r\n" if ehlo else b"250 ok\r\n")
        await writer.drain()


@pytest.mark.parametrize("after_timeout", ["redeliver", "dedupe"])
async def test_no_reply_after_the_final_dot(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter, after_timeout: str
) -> None:
    """Outcome unknown: the message stays on the server. The default delivers it again at the
    next poll; after_timeout: dedupe remembers it and does not, also under a new UID."""
    message = b"Message-ID: <dot@test>\nSubject: lost reply\n\nbody\n"
    dovecot.deliver(mailbox_user, [message])
    server = await asyncio.start_server(_silent_after_the_dot, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = account(
            configs,
            dovecot,
            mailbox_user,
            smtp=f"127.0.0.1:{port}",
            to=["u@localhost"],
            after_timeout=after_timeout,
        )
        (outcome,) = await poll_once(config)
    finally:
        server.close()
    assert isinstance(outcome.error, DeliveryUncertain), outcome.line()
    assert "gave no final reply" in outcome.line()
    assert dovecot.count(mailbox_user) == 1

    async with smtp_sink() as sink:
        config = account(
            configs,
            dovecot,
            mailbox_user,
            smtp=f"127.0.0.1:{sink.port}",
            to=["u@localhost"],
            after_timeout=after_timeout,
        )
        (outcome,) = await poll_once(config)
        assert outcome.ok, outcome.line()
        if after_timeout == "redeliver":
            assert [strip_received(a.data)[1] for a in sink.accepted] == [as_delivered(message)]
            assert dovecot.count(mailbox_user) == 0
            return
        assert sink.accepted == [], "a message the MTA may have must not be sent twice"
        assert dovecot.count(mailbox_user) == 1, "and it is never deleted on an unknown outcome"
        # The same message again under a new UID (a server re-import, say): known by digest.
        dovecot.deliver(mailbox_user, [b"Received: by relay.test\n" + message])
        (outcome,) = await poll_once(config)
        assert sink.accepted == []
        assert outcome.result is not None and outcome.result.held == 1, outcome.line()
        assert dovecot.count(mailbox_user) == 2
        # A different message still goes through.
        dovecot.deliver(mailbox_user, [b"Message-ID: <other@test>\n\nother\n"])
        (outcome,) = await poll_once(config)
        assert len(sink.accepted) == 1 and outcome.ok, outcome.line()
        # The MTA's log shows it does not have the message: released, both copies go.
        (name,) = [a.name for a in load(config).accounts]
        assert release(state_file_of(str(config)), [name]) == {name: 2}
        (outcome,) = await poll_once(config)
        assert outcome.ok and outcome.result is not None, outcome.line()
        assert outcome.result.held == 0 and len(sink.accepted) == 3
        assert dovecot.count(mailbox_user) == 0


async def test_slow_final_reply_with_dedupe_is_not_delivered_twice(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter
) -> None:
    """A slow filter may queue the message after fetchd stopped waiting: no second offer."""
    dovecot.deliver(mailbox_user, [b"Message-ID: <slow@test>\n\nslow filter\n"])
    async with smtp_sink(delay=2.5) as sink:
        config = account(
            configs,
            dovecot,
            mailbox_user,
            smtp=f"127.0.0.1:{sink.port}",
            to=["u@localhost"],
            timeout=1,
            after_timeout="dedupe",
        )
        (outcome,) = await poll_once(config)
        assert isinstance(outcome.error, DeliveryUncertain), outcome.line()
        (outcome,) = await poll_once(config)
    assert outcome.ok, outcome.line()
    assert sink.connections == 1, "the second poll did not offer the message again"
    assert dovecot.count(mailbox_user) == 1


class PipeliningMTA:
    """A scripted MTA that offers PIPELINING and answers the envelope all at once, in one
    write, or one byte at a time; ``replies`` maps a command's start to its reply."""

    def __init__(self, chunking: str = "together", replies: dict[bytes, bytes] | None = None):
        self.chunking = chunking
        self.replies = replies or {}
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []

    def reply(self, line: bytes) -> bytes:
        for start, reply in self.replies.items():
            if line.upper().startswith(start):
                return reply
        return b"354 go ahead\r\n" if line.upper().startswith(b"DATA") else b"250 ok\r\n"

    async def send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        pieces = [data[i : i + 1] for i in range(len(data))] if self.chunking == "bytes" else [data]
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            if self.chunking == "bytes":
                await asyncio.sleep(0.001)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mta.test ESMTP\r\n")
        pending = b""
        while line := await reader.readline():
            command = line.rstrip(b"\r\n")
            self.commands.append(command)
            if command.upper().startswith(b"EHLO"):
                writer.write(b"250-mta.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                continue
            reply = self.reply(command)
            pending += reply
            if command.upper().startswith((b"MAIL", b"RCPT")):
                continue  # answered with DATA's reply, in one go
            await self.send(writer, pending)
            pending = b""
            if command.upper() == b"DATA" and reply.startswith(b"354"):
                data = b""
                while (data_line := await reader.readline()) not in (b".\r\n", b""):
                    data += data_line
                self.messages.append(data + data_line)
                await self.send(writer, self.replies.get(b".", b"250 queued\r\n"))


@pytest.mark.parametrize("chunking", ["together", "bytes"])
async def test_pipelined_envelope_delivers_byte_exact(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter, chunking: str
) -> None:
    """MAIL, RCPT and DATA go in one write; their replies may come together or a byte at a
    time, and each is matched to its command."""
    messages = list(corpus_messages().values())[:8]
    dovecot.deliver(mailbox_user, messages)
    mta = PipeliningMTA(chunking)
    to = ("a@localhost", "b@localhost")
    outcome = await poll_into(configs, dovecot, mailbox_user, mta, to, limit=1 << 24)
    assert outcome.ok, outcome.line()
    delivered = [strip_received(m.removesuffix(b".\r\n"))[1] for m in mta.messages]
    assert delivered == [re.sub(rb"(?m)^\.", b"..", as_delivered(m)) for m in messages]
    assert dovecot.count(mailbox_user) == 0
    assert mta.commands.count(b"RSET") == 0


@pytest.mark.parametrize(
    ("replies", "refused"),
    [
        (
            {
                b"MAIL": b"550 5.7.1 sender refused\r\n",
                b"RCPT": b"503 no MAIL\r\n",
                b"DATA": b"503 no\r\n",
            },
            "550",
        ),
        (
            {b"RCPT": b"550 5.1.1 no such user\r\n", b"DATA": b"554 5.5.1 no valid recipients\r\n"},
            "no such user",
        ),
        (
            {
                b"RCPT": b"550 5.1.1 no such user\r\n",
                b"DATA": b"354 go on\r\n",
                b".": b"554 no valid recipients\r\n",
            },
            "no such user",
        ),
    ],
    ids=["mail refused", "every rcpt refused", "every rcpt refused, DATA taken"],
)
async def test_pipelined_refusals_keep_the_message(
    dovecot: Dovecot,
    mailbox_user: str,
    configs: ConfigWriter,
    replies: dict[bytes, bytes],
    refused: str,
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: refused\n\nbody\n"])
    mta = PipeliningMTA(replies=replies)
    outcome = await poll_into(configs, dovecot, mailbox_user, mta, ("a@localhost",))
    assert outcome.result is not None and outcome.result.rejected == 1, outcome.line()
    assert refused in " ".join(outcome.result.problems)
    assert dovecot.count(mailbox_user) == 1, "refused for good: kept on the server"
    # A DATA that was taken anyway is ended empty, never with the message in it.
    assert all(m == b".\r\n" for m in mta.messages)
    assert b"RSET" in mta.commands, "the envelope is reset for the next message"


async def test_pipelined_replies_arriving_before_the_reader_resumes_are_kept() -> None:
    """aiosmtplib drops what arrives while a parsed reply waits to be picked up; with several
    commands in flight that is the next reply, and the transaction would hang."""

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.written = b""

        def write(self, data: Any) -> None:
            self.written += bytes(data)

        def is_closing(self) -> bool:
            return False

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

    protocol = _Protocol(loop=asyncio.get_running_loop())
    transport = Transport()
    protocol.connection_made(transport)
    commands = [b"MAIL FROM:<a@test>\r\n", b"RCPT TO:<b@test>\r\n", b"DATA\r\n"]
    task = asyncio.create_task(protocol.pipeline(commands, 5))
    await asyncio.sleep(0)
    assert transport.written == b"".join(commands), "all three in one write"
    protocol.data_received(b"250 sender ok\r\n")  # the reader is woken, but has not run yet
    protocol.data_received(b"250 rcpt ok\r\n354 go")
    protocol.data_received(b" ahead\r\n")
    replies = await asyncio.wait_for(task, 5)
    assert [(r.code, r.message) for r in replies] == [
        (250, "sender ok"),
        (250, "rcpt ok"),
        (354, "go ahead"),
    ]


@pytest.mark.parametrize(
    "replies",
    [
        {b"DATA": b"hello there\r\n"},  # not a reply at all
        {b"DATA": b"250 ok\r\n354 go ahead\r\n"},  # one reply too many
        {b"RCPT": b"252 cannot verify\r\n", b"DATA": b"554 no valid recipients\r\n"},
    ],
    ids=["malformed", "extra reply", "success code as refusal"],
)
async def test_pipelined_replies_out_of_step_never_count_as_delivered(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter, replies: dict[bytes, bytes]
) -> None:
    """A reply that makes no sense, or one too many, shifts every later one: fetchd drops the
    connection and keeps the message, rather than take some other command's 250 for it."""
    dovecot.deliver(mailbox_user, [b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n"])
    mta = PipeliningMTA(replies=replies)
    outcome = await poll_into(configs, dovecot, mailbox_user, mta, ("a@localhost",))
    assert isinstance(outcome.error, DeliveryDeferred), outcome.line()
    assert not isinstance(outcome.error, DeliveryUncertain)
    assert "out of step with the MTA" in outcome.line()
    assert dovecot.count(mailbox_user) == 2, "nothing deleted"


async def test_mta_closing_before_the_message_is_retried_also_with_dedupe(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter
) -> None:
    """421 and a closed line before the message was sent: the MTA cannot have it, so
    after_timeout: dedupe does not hold it back; the next poll delivers it."""
    dovecot.deliver(mailbox_user, [b"Message-ID: <shut@test>\nSubject: s\n\nbody\n"])

    async def shutting_down(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mta.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-mta.test\r\n250 PIPELINING\r\n")
        await writer.drain()
        await reader.readline()
        writer.write(b"421 4.3.2 shutting down\r\n")
        await writer.drain()
        writer.close()

    outcome = await poll_into(configs, dovecot, mailbox_user, shutting_down, after_timeout="dedupe")
    assert isinstance(outcome.error, DeliveryDeferred), outcome.line()
    assert not isinstance(outcome.error, DeliveryUncertain), outcome.line()
    async with smtp_sink() as sink:
        config = account(
            configs,
            dovecot,
            mailbox_user,
            smtp=f"127.0.0.1:{sink.port}",
            to=["u@localhost"],
            after_timeout="dedupe",
        )
        (outcome,) = await poll_once(config)
        assert outcome.ok and len(sink.accepted) == 1, outcome.line()
    assert dovecot.count(mailbox_user) == 0
