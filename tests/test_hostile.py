"""Hostile and broken peers: POP3/IMAP servers, MTAs and configuration files that misbehave.

Every test is bounded in time: accounts use 2 s timeouts and every poll runs under
asyncio.wait_for, so a hang shows as a failure. Each test that once exposed a bug in fetchd
names the scenario; they stay as regression tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from fetchd.config import load
from fetchd.errors import (
    ConfigError,
    DeliveryDeferred,
    FetchdError,
    PermanentError,
    ProtocolError,
    TemporaryError,
)
from fetchd.state import State, release
from fetchd.supervisor import Outcome
from tests.conftest import ConfigWriter
from tests.support.sink import Sink, smtp_sink
from tests.test_interop import poll_once

SECRET = "Sup3r-s3cret-pw"
IO_TIMEOUT = 2
POLL_LIMIT = 12.0  # no poll in this file may take longer than this

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# ---------------------------------------------------------------------------------------------
# plumbing


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[int]:
    """A loopback TCP server running `handler` per connection; yields its port."""
    tasks: set[asyncio.Task[Any]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            tasks.discard(task)
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@asynccontextmanager
async def mta(**kwargs: Any) -> AsyncIterator[Sink]:
    async with smtp_sink(**kwargs) as sink:
        yield sink


def refuse(sink: Sink, marker: bytes, reply: str) -> Callable[[], None]:
    """Make the sink answer ``reply`` to messages containing ``marker``; returns the undo."""
    original = sink.handle_DATA

    async def picky(srv: Any, session: Any, envelope: Any) -> str:
        if marker in envelope.original_content:
            return reply
        result: str = await original(srv, session, envelope)
        return result

    sink.handle_DATA = picky  # type: ignore[method-assign]

    def undo() -> None:
        sink.handle_DATA = original  # type: ignore[method-assign]

    return undo


def write_config(
    configs: ConfigWriter, protocol: str, port: int, smtp_port: int, **extra: Any
) -> Path:
    account: dict[str, Any] = {
        "name": "victim",
        "protocol": protocol,
        "host": "127.0.0.1",
        "port": port,
        "user": "alice",
        "password": SECRET,
        "timeout": IO_TIMEOUT,
        "tls": {"mode": "none", "allow_plaintext": True},
        "deliver": {"smtp": f"127.0.0.1:{smtp_port}", "to": ["alice@localhost"], "timeout": 3},
    }
    deliver = extra.pop("deliver", None)
    account.update(extra)
    if deliver:
        account["deliver"].update(deliver)
    return configs.write([account])


async def poll(config: Path, limit: float = POLL_LIMIT) -> Outcome:
    (outcome,) = await asyncio.wait_for(poll_once(config), limit)
    return outcome


def assert_no_secret(outcome: Outcome, caplog: pytest.LogCaptureFixture | None = None) -> None:
    import base64

    token = base64.b64encode(f"\0alice\0{SECRET}".encode()).decode()
    texts = [outcome.line(), str(outcome.error)]
    if caplog is not None:
        texts += [r.getMessage() for r in caplog.records]
    for text in texts:
        assert SECRET not in text, text
        assert token not in text, text


def bodies(sink: Sink) -> list[bytes]:
    """What the MTA got, without fetchd's Received header."""
    out = []
    for got in sink.accepted:
        data = got.data
        end = data.index(b"\r\n", data.index(b"\r\n\t") + 1)  # Received: spans several lines
        while data[end + 2 : end + 3] == b"\t":
            end = data.index(b"\r\n", end + 2)
        out.append(data[end + 2 :])
    return out


def msg(n: int, size: int = 0) -> bytes:
    body = b"From: a@example.org\r\nSubject: message %d\r\n\r\nbody of %d\r\n" % (n, n)
    return body + b"x" * size + (b"\r\n" if size else b"")


# ---------------------------------------------------------------------------------------------
# a scriptable POP3 server; the mailbox survives between sessions


class FakePOP3:
    """RFC 1939 with UIDL; override on_<command> to misbehave. DELE takes effect on QUIT."""

    capa = b"+OK\r\nUSER\r\nUIDL\r\n.\r\n"

    def __init__(self, messages: list[tuple[bytes, bytes]]) -> None:
        self.mailbox = list(messages)  # (uidl, body)
        self.commands: list[bytes] = []
        self.raw = bytearray()
        self.sessions = 0

    # helpers for subclasses
    def stuffed(self, body: bytes) -> bytes:
        lines = body.split(b"\r\n")
        if lines and lines[-1] == b"":
            lines.pop()
        out = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
        return out + b".\r\n"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        self.session = list(self.mailbox)
        self.marked: set[int] = set()
        writer.write(b"+OK fake POP3 ready\r\n")
        while line := await reader.readline():
            self.raw += line
            words = line.rstrip(b"\r\n").split(b" ")
            name = words[0].upper().decode("ascii", "replace")
            self.commands.append(line.rstrip(b"\r\n"))
            method = getattr(self, f"on_{name.lower()}", None)
            if method is None:
                writer.write(b"-ERR unknown command\r\n")
                continue
            if await method(writer, words[1:]) == "close":
                await writer.drain()
                return
            await writer.drain()

    async def on_capa(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
        w.write(self.capa)

    async def on_user(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
        w.write(b"+OK\r\n")

    async def on_pass(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
        w.write(b"+OK logged in\r\n")

    async def on_uidl(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
        lines = b"".join(b"%d %s\r\n" % (i + 1, uid) for i, (uid, _) in enumerate(self.session))
        w.write(b"+OK\r\n" + lines + b".\r\n")

    async def on_list(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
        lines = b"".join(b"%d %d\r\n" % (i + 1, len(b)) for i, (_, b) in enumerate(self.session))
        w.write(b"+OK\r\n" + lines + b".\r\n")

    async def on_retr(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
        n = int(args[0])
        w.write(b"+OK message follows\r\n" + self.stuffed(self.session[n - 1][1]))

    async def on_dele(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
        self.marked.add(int(args[0]))
        w.write(b"+OK marked\r\n")

    async def on_quit(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
        gone = {id(self.session[n - 1]) for n in self.marked}
        self.mailbox = [m for m in self.mailbox if id(m) not in gone]
        w.write(b"+OK bye\r\n")
        return "close"

    def sent(self, name: bytes) -> list[bytes]:
        return [c for c in self.commands if c.upper().startswith(name)]


@asynccontextmanager
async def pop3_setup(
    configs: ConfigWriter, server: FakePOP3, **extra: Any
) -> AsyncIterator[tuple[Path, Sink]]:
    async with mta() as sink, serve(server.handle) as port:
        yield write_config(configs, "pop3", port, sink.port, **extra), sink


# ---------------------------------------------------------------------------------------------
# POP3 tests


async def test_pop3_baseline_works(configs: ConfigWriter) -> None:
    server = FakePOP3([(b"u1", msg(1)), (b"u2", msg(2))])
    async with pop3_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert outcome.ok, outcome.line()
    assert bodies(sink) == [msg(1), msg(2)]
    assert server.mailbox == []


async def test_pop3_connection_cut_mid_retr(configs: ConfigWriter) -> None:
    class Server(FakePOP3):
        async def on_retr(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(b"+OK\r\n" + msg(1)[:30])
            return "close"

    server = Server([(b"u1", msg(1))])
    async with pop3_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert isinstance(outcome.error, TemporaryError), outcome.line()
    assert "closed" in str(outcome.error)
    assert sink.accepted == [] and server.mailbox != [] and not server.sent(b"DELE")


async def test_pop3_ok_then_silence_times_out(configs: ConfigWriter) -> None:
    class Server(FakePOP3):
        async def on_retr(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(b"+OK here it comes\r\nSubject: x\r\n")
            await asyncio.sleep(60)

    server = Server([(b"u1", msg(1))])
    async with pop3_setup(configs, server) as (config, sink):
        start = time.monotonic()
        outcome = await poll(config)
    assert time.monotonic() - start < IO_TIMEOUT + 3
    assert isinstance(outcome.error, TemporaryError) and "sent nothing" in str(outcome.error)
    assert sink.accepted == [] and server.mailbox != []


async def test_pop3_terminator_glued_to_text_is_not_an_end(configs: ConfigWriter) -> None:
    """`text.\\r\\n` is not the end of a message: wait (bounded), never deliver it cut short."""

    class Server(FakePOP3):
        async def on_retr(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(b"+OK\r\nSubject: x\r\n\r\nlast line.\r\n")
            await asyncio.sleep(60)

    server = Server([(b"u1", msg(1))])
    async with pop3_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert isinstance(outcome.error, TemporaryError), outcome.line()
    assert sink.accepted == [] and not server.sent(b"DELE")


async def test_pop3_gigantic_status_line_is_refused(configs: ConfigWriter) -> None:
    class Server(FakePOP3):
        async def on_uidl(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            for _ in range(40):  # 40 MiB without a line end
                w.write(b"+OK" + b"A" * (1 << 20))
                await w.drain()
            await asyncio.sleep(60)

    server = Server([(b"u1", msg(1))])
    async with pop3_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert isinstance(outcome.error, ProtocolError), outcome.line()
    assert sink.accepted == []


async def test_pop3_gigantic_body_line_is_refused(configs: ConfigWriter) -> None:
    class Server(FakePOP3):
        async def on_retr(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(b"+OK\r\n")
            for _ in range(40):
                w.write(b"B" * (1 << 20))
                await w.drain()
            await asyncio.sleep(60)

    server = Server([(b"u1", msg(1))])
    async with pop3_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert isinstance(outcome.error, ProtocolError), outcome.line()
    assert sink.accepted == [] and server.mailbox != []


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"-ERR [IN-USE] mailbox locked\r\n", TemporaryError),
        (b"-ERR [LOGIN-DELAY] wait\r\n", TemporaryError),
        (b"-ERR [SYS/TEMP] disk trouble\r\n", TemporaryError),
        (b"-ERR [AUTH] bad password\r\n", PermanentError),
        (b"-ERR [SYS/PERM] account disabled\r\n", PermanentError),
        (b"-ERR invalid password\r\n", PermanentError),
    ],
)
async def test_pop3_login_errors_are_classified(
    configs: ConfigWriter, caplog: pytest.LogCaptureFixture, reply: bytes, error: type
) -> None:
    class Server(FakePOP3):
        async def on_pass(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(reply)

    server = Server([(b"u1", msg(1))])
    caplog.set_level(logging.DEBUG)
    async with pop3_setup(configs, server) as (config, _):
        outcome = await poll(config)
    assert type(outcome.error) is error, outcome.line()
    assert "victim" in outcome.line() and "127.0.0.1" in outcome.line()
    assert_no_secret(outcome, caplog)


@pytest.mark.parametrize(
    "uidl",
    [
        b"+OK\r\nx u1\r\n.\r\n",  # no number
        b"+OK\r\n\r\n.\r\n",  # empty line
    ],
)
async def test_pop3_malformed_uidl_is_a_protocol_error(configs: ConfigWriter, uidl: bytes) -> None:
    class Server(FakePOP3):
        async def on_uidl(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(uidl)

    server = Server([(b"u1", msg(1))])
    async with pop3_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert isinstance(outcome.error, ProtocolError), outcome.line()
    assert sink.accepted == [] and not server.sent(b"DELE") and not server.sent(b"RETR")


async def test_pop3_without_uidl_is_permanent_only_with_keep(configs: ConfigWriter) -> None:
    class Server(FakePOP3):
        async def on_uidl(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(b"-ERR what?\r\n")

    server = Server([(b"u1", msg(1))])
    async with pop3_setup(configs, server, keep=True) as (config, sink):
        outcome = await poll(config)
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert "keep: true needs it" in str(outcome.error)
    assert sink.accepted == [] and server.mailbox != []
    async with pop3_setup(configs, server) as (config, sink):  # deleting: UIDs not needed
        outcome = await poll(config)
    assert outcome.ok, outcome.line()
    assert bodies(sink) == [msg(1)] and server.mailbox == []


async def test_pop3_message_without_a_uid_is_delivered_once(configs: ConfigWriter) -> None:
    class Server(FakePOP3):
        async def on_uidl(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(b"+OK\r\n1\r\n2 u2\r\n.\r\n")  # message 1 has no UID

    server = Server([(b"u1", msg(1)), (b"u2", msg(2))])
    async with pop3_setup(configs, server, keep=True) as (config, sink):
        first = await poll(config)
        second = await poll(config)
    assert first.ok and second.ok, (first.line(), second.line())
    assert sorted(bodies(sink)) == sorted([msg(1), msg(2)]), "each delivered exactly once"


async def test_pop3_list_and_uidl_disagree_on_numbers(configs: ConfigWriter) -> None:
    class Server(FakePOP3):
        async def on_list(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(b"+OK\r\n7 100\r\n9 abc\r\n.\r\n")

    server = Server([(b"u1", msg(1)), (b"u2", msg(2))])
    async with pop3_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert outcome.ok, outcome.line()
    assert bodies(sink) == [msg(1), msg(2)]


async def test_pop3_long_and_odd_uids_are_remembered(configs: ConfigWriter) -> None:
    uids = [b"a" * 1000, b"<id@host>", b"!#$%&'*+/=?^_`{|}~", b"1"]
    server = FakePOP3([(u, msg(i)) for i, u in enumerate(uids)])
    async with pop3_setup(configs, server, keep=True) as (config, sink):
        first = await poll(config)
        second = await poll(config)
    assert first.ok and second.ok, (first.line(), second.line())
    assert len(sink.accepted) == len(uids), "a second poll must not deliver again"


async def test_pop3_unsolicited_lines_after_greeting(configs: ConfigWriter) -> None:
    class Server(FakePOP3):
        async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"+OK extra\r\n-ERR noise\r\n")
            await super().handle(reader, writer)

    server = Server([(b"u1", msg(1))])
    async with pop3_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    # Whatever happens, no message may be deleted that did not reach the MTA intact.
    assert bodies(sink) in ([], [msg(1)]), bodies(sink)
    if not sink.accepted:
        assert server.mailbox != []
    assert outcome.ok or isinstance(outcome.error, FetchdError), outcome.line()


async def test_pop3_dele_refused_commits_nothing(configs: ConfigWriter) -> None:
    class Server(FakePOP3):
        refuse = True

        async def on_dele(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            if self.refuse and args == [b"2"]:
                w.write(b"-ERR cannot\r\n")
            else:
                await super().on_dele(w, args)

    server = Server([(b"u1", msg(1)), (b"u2", msg(2))])
    async with pop3_setup(configs, server) as (config, sink):
        outcome = await poll(config)
        assert isinstance(outcome.error, TemporaryError), outcome.line()
        assert "DELE" in str(outcome.error)
        assert not server.sent(b"QUIT") and len(server.mailbox) == 2
        server.refuse = False
        again = await poll(config)
    assert again.ok, again.line()
    assert bodies(sink) == [msg(1), msg(2)], "delivered exactly once"
    assert server.mailbox == []


async def test_pop3_quit_refused_is_an_error(configs: ConfigWriter) -> None:
    class Server(FakePOP3):
        async def on_quit(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(b"-ERR [SYS/TEMP] could not update\r\n")
            return "close"

    server = Server([(b"u1", msg(1))])
    async with pop3_setup(configs, server) as (config, sink):
        outcome = await poll(config)
        assert isinstance(outcome.error, TemporaryError), outcome.line()
        assert outcome.result is not None and outcome.result.deleted == 0
        again = await poll(config)  # the message is still there: deleted, not re-delivered
    assert isinstance(again.error, TemporaryError)
    assert len(sink.accepted) == 1


async def test_pop3_rfc1939_server_without_capa(configs: ConfigWriter) -> None:
    class Server(FakePOP3):
        capa = b"-ERR unknown\r\n"

    server = Server([(b"u1", msg(1))])
    async with pop3_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert outcome.ok, outcome.line()
    assert bodies(sink) == [msg(1)]


async def test_pop3_non_ascii_uids_do_not_collide(configs: ConfigWriter) -> None:
    server = FakePOP3([(b"caf\xe9", msg(1))])
    async with pop3_setup(configs, server) as (config, sink):
        first = await poll(config)
        assert first.ok and server.mailbox == []
        server.mailbox = [(b"caf\xe8", msg(2))]  # a new message with another UID
        second = await poll(config)
    assert isinstance(second.error, ProtocolError) or bodies(sink) == [msg(1), msg(2)]
    assert server.mailbox != [] or bodies(sink) == [msg(1), msg(2)], "message 2 was lost"


async def test_pop3_uid_with_spaces_does_not_collide(configs: ConfigWriter) -> None:
    server = FakePOP3([(b"abc 1", msg(1))])
    async with pop3_setup(configs, server) as (config, sink):
        first = await poll(config)
        assert first.ok and server.mailbox == []
        server.mailbox = [(b"abc 2", msg(2))]
        await poll(config)
    assert server.mailbox != [] or bodies(sink) == [msg(1), msg(2)], "message 2 was lost"


async def test_release_fetches_kept_mail_again(configs: ConfigWriter) -> None:
    """A message the MTA refused for good is kept on the server and not fetched again, until
    `fetchd release` says the cause was dealt with; the next poll then delivers it."""
    server = FakePOP3([(b"u1", msg(1)), (b"u2", msg(2))])
    async with mta() as sink, serve(server.handle) as port:
        undo = refuse(sink, b"message 1", "554 5.7.1 policy says no")
        config = write_config(configs, "pop3", port, sink.port)
        first = await poll(config)
        assert first.ok and first.result is not None and first.result.rejected == 1
        second = await poll(config)
        assert second.ok and bodies(sink) == [msg(2)], "kept, not fetched again"
        undo()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fetchd",
            "release",
            "-c",
            str(config),
            "victim",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        assert out.decode().splitlines() == [
            "victim: 1 kept on the server, fetched again at the next poll"
        ]
        last = await poll(config)
    assert last.ok, last.line()
    assert bodies(sink) == [msg(2), msg(1)] and server.mailbox == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_release_refuses_to_write_another_users_state(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    sqlite3.connect(path).close()
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match=r"belongs to user .*runuser -u"):
        release(str(path), ["a"])


async def test_pop3_size_warning_for_a_shared_uid_is_given_once(
    configs: ConfigWriter, caplog: pytest.LogCaptureFixture
) -> None:
    """The note that a message is too big is kept while it is listed, also under a UID that
    several messages share (known by no usable key of its own)."""
    caplog.set_level(logging.WARNING)
    server = FakePOP3([(b"dup", msg(1, size=5000)), (b"dup", msg(2, size=5000)), (b"u3", msg(3))])
    async with pop3_setup(configs, server, limit=1000, keep=True) as (config, _sink):
        for _ in range(3):
            assert (await poll(config)).ok
    warnings = [r.getMessage() for r in caplog.records if "over the limit" in r.getMessage()]
    assert len(warnings) == 1, warnings


async def test_release_names_each_account_once_and_only_configured_ones(
    configs: ConfigWriter,
) -> None:
    config = write_config(configs, "pop3", 1, 2)
    state = await State.open(str(configs.directory / "state.sqlite3"), lock=True)  # a daemon
    try:
        await state.record_rejected("victim", "", 0, "u1", 554, "no")
        await state.record_rejected("victim2", "", 0, "u2", 554, "no")

        async def release_cli(*names: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "fetchd", "release", "-c", str(config), *names),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await proc.communicate()
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

        code, out, err = await release_cli("victim", "typo")
        assert code != 0 and "no account typo" in err and out == ""
        assert await state.rejected("victim", "", 0) == {"u1"}, "nothing released on an error"
        code, out, _ = await release_cli("victim", "victim")
        assert code == 0
        assert out.splitlines() == ["victim: 1 kept on the server, fetched again at the next poll"]
        assert await state.rejected("victim", "", 0) == set()
        assert await state.rejected("victim2", "", 0) == {"u2"}, "another account untouched"
        code, out, _ = await release_cli("victim")
        assert (code, out) == (0, "victim: nothing was kept on the server\n")
    finally:
        await state.close()


async def test_pop3_duplicate_uids_never_lose_a_message(configs: ConfigWriter) -> None:
    server = FakePOP3([(b"dup", msg(1)), (b"dup", msg(2))])
    async with mta() as sink, serve(server.handle) as port:
        undo = refuse(sink, b"message 2", "451 4.3.0 try later")
        config = write_config(configs, "pop3", port, sink.port)
        first = await poll(config)
        assert isinstance(first.error, DeliveryDeferred), first.line()
        assert [b for _, b in server.mailbox] == [msg(2)]
        undo()
        await poll(config)
    assert bodies(sink) == [msg(1), msg(2)] or server.mailbox != [], "message 2 was lost"


async def test_pop3_retr_much_shorter_than_list_size_is_not_delivered(
    configs: ConfigWriter,
) -> None:
    class Server(FakePOP3):
        async def on_list(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(b"+OK\r\n1 50000\r\n.\r\n")

    server = Server([(b"u1", msg(1))])
    async with pop3_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert sink.accepted == [] and server.mailbox != [], outcome.line()


async def test_pop3_unstuffed_dot_line_never_deletes_the_rest(configs: ConfigWriter) -> None:
    full = b"Subject: x\r\n\r\nfirst half\r\n.\r\nsecond half\r\n"

    class Server(FakePOP3):
        def stuffed(self, body: bytes) -> bytes:
            return body + b".\r\n"  # no dot-stuffing at all

    server = Server([(b"u1", full)])
    async with pop3_setup(configs, server) as (config, sink):
        first = await poll(config)
        assert isinstance(first.error, ProtocolError), first.line()
        await poll(config)
    truncated = [b for b in bodies(sink) if b"second half" not in b]
    assert not (truncated and server.mailbox == []), "only the first half survives"


async def test_pop3_one_unreadable_message_does_not_block_the_others(
    configs: ConfigWriter,
) -> None:
    class Server(FakePOP3):
        async def on_retr(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            if args == [b"1"]:
                w.write(b"-ERR [SYS/PERM] message is corrupt\r\n")
            else:
                await super().on_retr(w, args)

    server = Server([(b"u1", msg(1)), (b"u2", msg(2))])
    async with pop3_setup(configs, server) as (config, sink):
        await poll(config)
        await poll(config)
    assert bodies(sink) == [msg(2)]


async def test_pop3_trickling_server_cannot_hold_the_poll_forever(
    configs: ConfigWriter,
) -> None:
    class Server(FakePOP3):
        async def on_retr(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(b"+OK\r\n")
            while True:
                w.write(b"x")
                await w.drain()
                await asyncio.sleep(IO_TIMEOUT / 4)

    server = Server([(b"u1", msg(1))])
    async with pop3_setup(configs, server) as (config, _):
        try:
            outcome = await poll(config, limit=5 * IO_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"poll still running after {5 * IO_TIMEOUT} s")
    assert isinstance(outcome.error, TemporaryError)


async def test_pop3_absurd_numbers_are_not_an_internal_error(configs: ConfigWriter) -> None:
    class Server(FakePOP3):
        async def on_list(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(b"+OK\r\n1 " + b"9" * 5000 + b"\r\n.\r\n")

    server = Server([(b"u1", msg(1))])
    async with pop3_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    # An unusable size is unknown (no size check), like any other malformed LIST size.
    assert outcome.ok, outcome.line()
    assert bodies(sink) == [msg(1)]

    class Numbers(FakePOP3):
        async def on_uidl(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(b"+OK\r\n" + b"9" * 5000 + b" u1\r\n.\r\n")

    async with pop3_setup(configs, Numbers([(b"u1", msg(1))])) as (config, _):
        outcome = await poll(config)
    assert isinstance(outcome.error, ProtocolError), outcome.line()


async def test_pop3_pipelined_retr_with_mta_deferral_deletes_only_delivered(
    configs: ConfigWriter,
) -> None:
    class Server(FakePOP3):
        capa = b"+OK\r\nUSER\r\nUIDL\r\nPIPELINING\r\n.\r\n"

    server = Server([(b"u%d" % i, msg(i, 20000)) for i in range(10)])
    async with mta() as sink, serve(server.handle) as port:
        refuse(sink, b"message 4", "421 4.3.0 shutting down")
        outcome = await poll(write_config(configs, "pop3", port, sink.port))
    assert isinstance(outcome.error, DeliveryDeferred), outcome.line()
    delivered = bodies(sink)
    assert delivered == [msg(i, 20000) for i in range(4)]
    assert [b for _, b in server.mailbox] == [msg(i, 20000) for i in range(4, 10)]


# ---------------------------------------------------------------------------------------------
# a scriptable IMAP server


class FakeIMAP:
    """Just enough IMAP4rev1 for fetchd; override on_<COMMAND> to misbehave."""

    caps = b"IMAP4rev1 UIDPLUS"

    def __init__(self, messages: dict[int, bytes], uidvalidity: int = 42) -> None:
        self.mailbox = dict(messages)
        self.uidvalidity = uidvalidity
        self.commands: list[bytes] = []
        self.flagged: set[int] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK fake IMAP ready\r\n")
        while line := await reader.readline():
            line = line.rstrip(b"\r\n")
            self.commands.append(line)
            tag, _, rest = line.partition(b" ")
            words = rest.split(b" ")
            name = words[0].upper()
            if name == b"UID":
                name = b"UID_" + words[1].upper()
                words = words[1:]
            method = getattr(self, f"on_{name.decode('ascii', 'replace').lower()}", None)
            if method is None:
                writer.write(tag + b" BAD unknown\r\n")
            elif await method(writer, tag, words[1:]) == "close":
                await writer.drain()
                return
            await writer.drain()

    async def on_capability(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
        w.write(b"* CAPABILITY " + self.caps + b"\r\n" + tag + b" OK done\r\n")

    async def on_login(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
        w.write(tag + b" OK logged in\r\n")

    async def on_authenticate(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
        w.write(tag + b" OK logged in\r\n")

    def select_lines(self) -> bytes:
        return (
            b"* %d EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY %d] ok\r\n* OK [UIDNEXT %d] next\r\n"
            % (len(self.mailbox), self.uidvalidity, max(self.mailbox, default=0) + 1)
        )

    async def on_select(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
        w.write(self.select_lines() + tag + b" OK [READ-WRITE] selected\r\n")

    def search_line(self) -> bytes:
        return b"* SEARCH " + b" ".join(b"%d" % u for u in sorted(self.mailbox)) + b"\r\n"

    async def on_uid_search(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
        if args and args[0].upper() == b"DELETED":
            found = b" ".join(b"%d" % u for u in sorted(self.flagged))
            w.write(b"* SEARCH " + found + b"\r\n" + tag + b" OK\r\n")
            return
        w.write(self.search_line() + tag + b" OK search done\r\n")

    def seq(self, uid: int) -> int:
        return sorted(self.mailbox).index(uid) + 1

    def fetch_response(self, uid: int) -> bytes:
        body = self.mailbox[uid]
        return b"* %d FETCH (UID %d RFC822.SIZE %d BODY[] {%d}\r\n%s)\r\n" % (
            self.seq(uid),
            uid,
            len(body),
            len(body),
            body,
        )

    def size_response(self, uid: int) -> bytes:
        return b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n" % (
            self.seq(uid),
            uid,
            len(self.mailbox[uid]),
        )

    async def on_uid_fetch(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
        uids = [u for u in uid_set(args[0]) if u in self.mailbox]
        respond = self.fetch_response if b"BODY" in b" ".join(args).upper() else self.size_response
        w.write(b"".join(respond(uid) for uid in uids) + tag + b" OK fetched\r\n")

    async def on_uid_store(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
        self.flagged |= set(uid_set(args[0])) & set(self.mailbox)
        w.write(tag + b" OK stored\r\n")

    async def on_uid_expunge(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
        lines = b""
        for uid in sorted(self.flagged, reverse=True):
            lines += b"* %d EXPUNGE\r\n" % self.seq(uid)
            del self.mailbox[uid]
        self.flagged.clear()
        w.write(lines + tag + b" OK expunged\r\n")

    async def on_logout(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
        w.write(b"* BYE bye\r\n" + tag + b" OK logged out\r\n")
        return "close"

    def sent(self, name: bytes) -> list[bytes]:
        return [c for c in self.commands if name in c.upper()]


def uid_set(text: bytes) -> list[int]:
    """``b"3,7:9"`` → ``[3, 7, 8, 9]``."""
    uids: list[int] = []
    for part in text.split(b","):
        first, _, last = part.partition(b":")
        uids += range(int(first), int(last or first) + 1)
    return uids


@asynccontextmanager
async def imap_setup(
    configs: ConfigWriter, server: FakeIMAP, **extra: Any
) -> AsyncIterator[tuple[Path, Sink]]:
    async with mta() as sink, serve(server.handle) as port:
        yield write_config(configs, "imap", port, sink.port, **extra), sink


async def test_imap_baseline_works(configs: ConfigWriter) -> None:
    server = FakeIMAP({3: msg(1), 7: msg(2)})
    async with imap_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert outcome.ok, outcome.line()
    assert bodies(sink) == [msg(1), msg(2)] and server.mailbox == {}


async def test_imap_literal_shorter_than_the_data_is_not_delivered(
    configs: ConfigWriter,
) -> None:
    class Server(FakeIMAP):
        def fetch_response(self, uid: int) -> bytes:
            body = self.mailbox[uid]
            return b"* 1 FETCH (UID %d BODY[] {20}\r\n%s)\r\n" % (uid, body)

    server = Server({1: msg(1)})
    async with imap_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert sink.accepted == [] and server.mailbox != {}, outcome.line()


async def test_imap_literal_longer_than_the_data_times_out(configs: ConfigWriter) -> None:
    class Server(FakeIMAP):
        def fetch_response(self, uid: int) -> bytes:
            body = self.mailbox[uid]
            return b"* 1 FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (uid, len(body) + 500, body)

    server = Server({1: msg(1)})
    async with imap_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert isinstance(outcome.error, TemporaryError), outcome.line()
    assert sink.accepted == [] and server.mailbox != {}


@pytest.mark.parametrize(
    "response",
    [
        b"* 1 FETCH (UID 99 BODY[] {5}\r\nhello)\r\n",  # another UID
        b"* 1 FETCH ()\r\n",
        b"* 1 FETCH (UID 1 BODY[] NIL)\r\n",
        b'* 1 FETCH (UID 1 BODY[] "tiny")\r\n',
        b"",  # nothing at all
    ],
)
async def test_imap_fetch_without_our_body(configs: ConfigWriter, response: bytes) -> None:
    class Server(FakeIMAP):
        def fetch_response(self, uid: int) -> bytes:
            return response

    server = Server({1: msg(1)})
    async with imap_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert outcome.result is not None and outcome.result.skipped == 1, outcome.line()
    problem = outcome.result.problems[0]
    assert "account victim" in problem and "no body for UID 1" in problem, problem
    assert sink.accepted == [] and server.mailbox != {} and not server.sent(b"STORE")


async def test_imap_bye_mid_session(configs: ConfigWriter) -> None:
    class Server(FakeIMAP):
        async def on_uid_fetch(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
            w.write(b"* BYE server shutting down\r\n")
            return "close"

    server = Server({1: msg(1)})
    async with imap_setup(configs, server) as (config, sink):
        start = time.monotonic()
        outcome = await poll(config)
    assert time.monotonic() - start < IO_TIMEOUT + 1, "connection loss must fail fast"
    assert isinstance(outcome.error, TemporaryError), outcome.line()
    assert sink.accepted == [] and server.mailbox != {}


async def test_imap_bye_without_close(configs: ConfigWriter) -> None:
    class Server(FakeIMAP):
        async def on_uid_fetch(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
            w.write(b"* BYE going away\r\n")
            await asyncio.sleep(60)

    server = Server({1: msg(1)})
    async with imap_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert isinstance(outcome.error, TemporaryError), outcome.line()
    assert sink.accepted == []


async def test_imap_connection_dropped_during_fetch_literal(configs: ConfigWriter) -> None:
    class Server(FakeIMAP):
        async def on_uid_fetch(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
            w.write(self.fetch_response(int(args[0]))[:60])
            return "close"

    server = Server({1: msg(1, 1000)})
    async with imap_setup(configs, server) as (config, sink):
        start = time.monotonic()
        outcome = await poll(config)
    assert time.monotonic() - start < IO_TIMEOUT + 1
    assert isinstance(outcome.error, TemporaryError), outcome.line()
    assert sink.accepted == [] and server.mailbox != {}


async def test_imap_connection_loss_error_names_account_and_command(
    configs: ConfigWriter,
) -> None:
    class Server(FakeIMAP):
        async def on_uid_fetch(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
            return "close"

    server = Server({1: msg(1)})
    async with imap_setup(configs, server) as (config, _):
        outcome = await poll(config)
    assert isinstance(outcome.error, TemporaryError)
    assert "victim" in str(outcome.error) and "FETCH" in str(outcome.error)


async def test_imap_unsolicited_responses_during_fetch(configs: ConfigWriter) -> None:
    class Server(FakeIMAP):
        def fetch_response(self, uid: int) -> bytes:
            noise = (
                b"* 5 EXPUNGE\r\n* 4 EXISTS\r\n* 2 FETCH (FLAGS (\\Seen))\r\n"
                b"* OK [ALERT] hello\r\ngarbage without star\r\n"
            )
            return noise + super().fetch_response(uid) + b"* 3 RECENT\r\n"

    server = Server({1: msg(1), 2: msg(2)})
    async with imap_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert outcome.ok, outcome.line()
    assert bodies(sink) == [msg(1), msg(2)]


async def test_imap_unsolicited_untagged_numbers_during_search_are_not_uids(
    configs: ConfigWriter,
) -> None:
    class Server(FakeIMAP):
        def search_line(self) -> bytes:
            return b"* 9 EXISTS\r\n* 8 RECENT\r\n* 7 EXPUNGE\r\n" + super().search_line()

    server = Server({1: msg(1)})
    async with imap_setup(configs, server) as (config, _sink):
        outcome = await poll(config)
    assert outcome.ok, outcome.line()
    assert [c for c in server.commands if b"FETCH" in c.upper()] == [
        c for c in server.commands if b"UID FETCH 1 " in c.upper()
    ]


async def test_imap_wrong_tag_fails_fast(configs: ConfigWriter) -> None:
    class Server(FakeIMAP):
        async def on_uid_fetch(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
            w.write(self.fetch_response(int(args[0])) + b"ZZZ9 OK not yours\r\n")

    server = Server({1: msg(1)})
    async with imap_setup(configs, server) as (config, sink):
        start = time.monotonic()
        outcome = await poll(config)
    assert time.monotonic() - start < IO_TIMEOUT + 1
    assert isinstance(outcome.error, ProtocolError), outcome.line()
    assert sink.accepted == [] and server.mailbox != {}


async def test_imap_server_that_never_answers(configs: ConfigWriter) -> None:
    class Server(FakeIMAP):
        async def on_select(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
            await asyncio.sleep(60)

    server = Server({1: msg(1)})
    async with imap_setup(configs, server) as (config, _):
        start = time.monotonic()
        outcome = await poll(config)
    assert time.monotonic() - start < 2 * IO_TIMEOUT + 1
    assert isinstance(outcome.error, TemporaryError) and "SELECT" in str(outcome.error)


async def test_imap_silent_greeting(configs: ConfigWriter) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(60)

    async with mta() as sink, serve(handler) as port:
        outcome = await poll(write_config(configs, "imap", port, sink.port))
    assert isinstance(outcome.error, TemporaryError), outcome.line()


async def test_imap_missing_uidvalidity(configs: ConfigWriter) -> None:
    class Server(FakeIMAP):
        def select_lines(self) -> bytes:
            return b"* 1 EXISTS\r\n"

    server = Server({1: msg(1)})
    async with imap_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert isinstance(outcome.error, ProtocolError), outcome.line()
    assert sink.accepted == []


async def test_imap_changed_uidvalidity_refetches_but_loses_nothing(
    configs: ConfigWriter,
) -> None:
    server = FakeIMAP({1: msg(1)})
    async with imap_setup(configs, server, keep=True) as (config, sink):
        assert (await poll(config)).ok
        server.uidvalidity = 43
        server.mailbox[2] = msg(2)
        again = await poll(config)
    assert again.ok, again.line()
    # Message 1 is recognised by its digest (uidvalidity_change: refetch): not delivered twice.
    assert bodies(sink) == [msg(1), msg(2)]


async def test_imap_changed_uidvalidity_is_remembered_beyond_a_cut_short_poll(
    configs: ConfigWriter,
) -> None:
    """After a UIDVALIDITY change, messages delivered before are recognised by their digest in
    every poll until one has gone through the whole folder, not only in the first one (here
    fetch_limit cuts each poll to one message)."""
    server = FakeIMAP({1: msg(1), 2: msg(2), 3: msg(3)})
    async with imap_setup(configs, server, keep=True, fetch_limit=1) as (config, sink):
        for _ in range(3):
            assert (await poll(config)).ok
        assert bodies(sink) == [msg(1), msg(2), msg(3)]
        server.uidvalidity = 43
        server.mailbox[4] = msg(4)
        outcomes = [await poll(config) for _ in range(5)]
    assert all(o.ok for o in outcomes), [o.line() for o in outcomes]
    assert bodies(sink) == [msg(1), msg(2), msg(3), msg(4)], "none delivered twice"
    state = await State.open(str(configs.directory / "state.sqlite3"))
    try:
        assert await state.known_digests("victim", "INBOX") == set(), "forgotten when done"
    finally:
        await state.close()


async def test_what_was_noticed_about_a_message_is_forgotten_when_it_is_gone(
    configs: ConfigWriter,
) -> None:
    """A message never fetched (too big) leaves a note in the state; once another client
    deletes it, the note goes too, so the state does not grow with a busy shared mailbox."""
    server = FakeIMAP({1: msg(1, size=5000), 2: msg(2)})
    async with imap_setup(configs, server, limit=1000) as (config, sink):
        assert (await poll(config)).ok
        path = str(configs.directory / "state.sqlite3")
        state = await State.open(path)
        try:
            assert await state.noticed("victim", "INBOX", 42) == {"1"}
        finally:
            await state.close()
        del server.mailbox[1]
        assert (await poll(config)).ok
    state = await State.open(path)
    try:
        assert await state.noticed("victim", "INBOX", 42) == set()
    finally:
        await state.close()
    assert bodies(sink) == [msg(2)]


async def test_old_digests_stay_while_a_message_was_not_compared(
    configs: ConfigWriter,
) -> None:
    """A message too big for this poll was not compared with the digests of the old
    UIDVALIDITY: they stay until it is, so it is not delivered twice once the limit goes."""
    server = FakeIMAP({1: msg(1, size=5000), 2: msg(2)})
    async with mta() as sink, serve(server.handle) as port:
        config = write_config(configs, "imap", port, sink.port, keep=True)
        assert (await poll(config)).ok
        server.uidvalidity = 43
        config = write_config(configs, "imap", port, sink.port, keep=True, limit=1000)
        assert (await poll(config)).ok
        config = write_config(configs, "imap", port, sink.port, keep=True)
        assert (await poll(config)).ok
    assert bodies(sink) == [msg(1, size=5000), msg(2)], "none delivered twice"


async def test_imap_absurd_uidvalidity_is_a_protocol_error(configs: ConfigWriter) -> None:
    server = FakeIMAP({1: msg(1)}, uidvalidity=10**25)
    async with imap_setup(configs, server) as (config, _sink):
        outcome = await poll(config)
    assert isinstance(outcome.error, ProtocolError), outcome.line()


async def test_imap_many_uids_in_search(configs: ConfigWriter) -> None:
    class Server(FakeIMAP):
        def search_line(self) -> bytes:
            return b"* SEARCH " + b" ".join(b"%d" % u for u in range(1, 200_001)) + b"\r\n"

        async def on_uid_fetch(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
            return "close"

    server = Server({1: msg(1)})
    async with imap_setup(configs, server) as (config, _):
        start = time.monotonic()
        outcome = await poll(config)
    assert time.monotonic() - start < IO_TIMEOUT + 3
    assert isinstance(outcome.error, TemporaryError), outcome.line()


async def test_imap_expunging_many_messages(configs: ConfigWriter) -> None:
    n = 3000
    server = FakeIMAP({u: msg(u) for u in range(1, n + 1)})
    async with imap_setup(configs, server) as (config, _sink):
        state = await State.open(str(configs.directory / "state.sqlite3"))
        try:  # all of them were delivered by an earlier poll
            await state.set_uidvalidity("victim", "INBOX", 42)
            for u in range(1, n + 1):
                await state.record("victim", "INBOX", 42, str(u))
        finally:
            await state.close()
        outcome = await poll(config)
    assert server.mailbox == {}
    assert outcome.ok, outcome.line()


async def test_imap_one_unreadable_message_does_not_block_the_others(
    configs: ConfigWriter,
) -> None:
    class Server(FakeIMAP):
        async def on_uid_fetch(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
            if 1 in uid_set(args[0]) and b"BODY" in b" ".join(args):  # the batch fails too
                w.write(tag + b" NO [SERVERBUG] cannot read message\r\n")
            else:
                await super().on_uid_fetch(w, tag, args)

    server = Server({1: msg(1), 2: msg(2)})
    async with imap_setup(configs, server) as (config, sink):
        await poll(config)
        await poll(config)
    assert bodies(sink) == [msg(2)]


async def test_imap_batch_with_a_broken_response_delivers_only_what_came_before(
    configs: ConfigWriter,
) -> None:
    """Several messages come in one response; after one that does not add up, nothing in that
    response is trusted: the ones before it are delivered, the ones after it asked for alone,
    and the broken one is kept on the server."""

    class Server(FakeIMAP):
        def fetch_response(self, uid: int) -> bytes:
            if uid == 3:  # more data than the literal announced
                body = self.mailbox[uid]
                return b"* 3 FETCH (UID 3 BODY[] {10}\r\n%s)\r\n" % body
            return super().fetch_response(uid)

    server = Server({u: msg(u) for u in range(1, 6)})
    async with imap_setup(configs, server) as (config, sink):
        outcome = await poll(config)
        assert outcome.ok and outcome.result is not None, outcome.line()
        assert outcome.result.skipped == 1 and "UID 3" in outcome.result.problems[0]
        assert bodies(sink) == [msg(1), msg(2), msg(4), msg(5)]
        assert server.sent(b"BODY.PEEK")[0].split(b" ")[3] == b"1:5", "asked in one command"
        assert sorted(server.mailbox) == [3], "only the broken one stays"
        await poll(config)
    assert bodies(sink) == [msg(1), msg(2), msg(4), msg(5)], "never sent twice"


async def test_imap_batch_answered_out_of_order_with_a_broken_one_first(
    configs: ConfigWriter,
) -> None:
    """The server answers UID 7 (broken) before UID 5: 5 is not trusted from that response,
    but asked for alone and delivered; 7 is kept on the server."""

    class Server(FakeIMAP):
        async def on_uid_fetch(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
            if b"BODY" in b" ".join(args) and uid_set(args[0]) == [5, 7]:
                broken = b"* 2 FETCH (UID 7 BODY[] {4}\r\n%s)\r\n" % self.mailbox[7]
                w.write(broken + self.fetch_response(5) + tag + b" OK fetched\r\n")
            else:
                await super().on_uid_fetch(w, tag, args)

    server = Server({5: msg(5), 7: msg(7)})
    async with imap_setup(configs, server) as (config, sink):
        outcome = await poll(config)
        assert outcome.ok, outcome.line()
        assert bodies(sink) == [msg(5)]
        assert sorted(server.mailbox) == [7]


async def test_imap_message_that_always_comes_broken_is_set_aside(
    configs: ConfigWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message the server always sends in a form that does not add up neither stops the
    others nor is asked for forever: once it came broken in three different hours, while
    other messages came whole, it is kept on the server, listed by `fetchd status`, and not
    fetched again; the others are delivered and deleted each time."""

    class Server(FakeIMAP):
        def fetch_response(self, uid: int) -> bytes:
            if uid == 2:  # the literal is shorter than announced: never a whole message
                return b"* 2 FETCH (UID 2 BODY[] {%d}\r\nshort)\r\n" % (len(msg(2)) - 3)
            return super().fetch_response(uid)

    clock = [1_800_000_000.0]
    real = time.time
    monkeypatch.setattr(time, "time", lambda: clock[0] + (real() - start))
    start = real()
    server = Server({1: msg(1), 2: msg(2), 3: msg(3)})
    outcomes = []
    async with imap_setup(configs, server) as (config, sink):
        for n, hours in enumerate([0, 0.1, 1, 2, 3], start=4):  # two polls in the first hour
            clock[0] = 1_800_000_000.0 + hours * 3600
            outcomes.append(await poll(config))
            server.mailbox[n] = msg(n)  # new mail behind the broken one
    assert all(o.ok for o in outcomes), [o.line() for o in outcomes]
    assert [o.result.skipped for o in outcomes if o.result] == [1, 1, 1, 0, 0]
    assert [o.result.unreadable for o in outcomes if o.result] == [0, 0, 0, 1, 0]
    assert sorted(bodies(sink)) == sorted(msg(n) for n in (1, 3, 4, 5, 6, 7))
    assert sorted(server.mailbox) == [2, 8], "the broken one stays; 8 came after the last poll"
    state = await State.open(str(configs.directory / "state.sqlite3"))
    try:
        (problem,) = await state.rejected("victim", "INBOX", server.uidvalidity)
    finally:
        await state.close()
    assert problem == "2"


async def test_imap_server_sending_everything_broken_sets_nothing_aside(
    configs: ConfigWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When no message comes whole the server is unwell, not the messages: the poll fails,
    as any protocol error does, and after the server recovers every message is delivered."""

    class Server(FakeIMAP):
        unwell = True

        def fetch_response(self, uid: int) -> bytes:
            if not self.unwell:
                return super().fetch_response(uid)
            body = self.mailbox[uid]
            return b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (
                self.seq(uid),
                uid,
                len(body) - 3,
                body,
            )

    clock = [1_800_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    server = Server({1: msg(1), 2: msg(2)})
    async with imap_setup(configs, server) as (config, sink):
        for hour in range(4):
            clock[0] = 1_800_000_000.0 + hour * 3600
            outcome = await poll(config)
            assert isinstance(outcome.error, ProtocolError), outcome.line()
        server.unwell = False
        after = await poll(config)
    assert after.ok, after.line()
    assert bodies(sink) == [msg(1), msg(2)] and server.mailbox == {}


async def test_imap_uid_after_the_literal_is_understood(configs: ConfigWriter) -> None:
    class Server(FakeIMAP):
        def fetch_response(self, uid: int) -> bytes:
            body = self.mailbox[uid]
            return b"* %d FETCH (BODY[] {%d}\r\n%s UID %d)\r\n" % (
                self.seq(uid),
                len(body),
                body,
                uid,
            )

    server = Server({3: msg(3), 4: msg(4)})
    async with imap_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert outcome.ok, outcome.line()
    assert bodies(sink) == [msg(3), msg(4)]


async def test_imap_batch_a_body_that_looks_like_a_fetch_response_is_only_a_body(
    configs: ConfigWriter,
) -> None:
    forged = b"Subject: forged\r\n\r\n* 2 FETCH (UID 2 BODY[] {7}\r\nevil!\r\n)\r\n"
    server = FakeIMAP({1: forged, 2: msg(2)})
    async with imap_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert outcome.ok, outcome.line()
    assert bodies(sink) == [forged, msg(2)]


async def test_imap_batches_are_bounded_by_count_and_bytes(configs: ConfigWriter) -> None:
    small = {u: msg(u) for u in range(1, 21)}
    big = {21: msg(21, 600_000), 22: msg(22, 300_000), 23: msg(23, 300_000), 24: msg(24)}
    server = FakeIMAP(small | big)
    async with imap_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert outcome.ok, outcome.line()
    assert bodies(sink) == [(small | big)[u] for u in range(1, 25)]
    fetches = [c.split(b" ")[3] for c in server.sent(b"BODY.PEEK")]
    # 16 at most; 600 KB alone; 300 KB twice is over 512 KiB, so apart.
    assert fetches == [b"1:16", b"17:20", b"21", b"22", b"23:24"]


async def test_imap_slow_but_steady_large_message(configs: ConfigWriter) -> None:
    class Server(FakeIMAP):
        async def on_uid_fetch(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
            data = self.fetch_response(int(args[0]))
            step = len(data) // 12
            for i in range(0, len(data), step):  # about 3 s, a chunk every 0.25 s
                w.write(data[i : i + step])
                await w.drain()
                await asyncio.sleep(0.25)
            w.write(tag + b" OK fetched\r\n")

    server = Server({1: msg(1, 100_000)})
    async with imap_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert outcome.ok, outcome.line()
    assert bodies(sink) == [msg(1, 100_000)]


async def test_pop3_slow_but_steady_large_message(configs: ConfigWriter) -> None:
    class Server(FakePOP3):
        async def on_retr(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            data = b"+OK\r\n" + self.stuffed(self.session[int(args[0]) - 1][1])
            step = len(data) // 12
            for i in range(0, len(data), step):
                w.write(data[i : i + step])
                await w.drain()
                await asyncio.sleep(0.25)

    server = Server([(b"u1", msg(1, 100_000))])
    async with pop3_setup(configs, server) as (config, sink):
        outcome = await poll(config)
    assert outcome.ok, outcome.line()
    assert bodies(sink) == [msg(1, 100_000)]


async def test_imap_endless_line_is_bounded(configs: ConfigWriter) -> None:
    class Server(FakeIMAP):
        async def on_select(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
            for _ in range(64):
                w.write(b"* OK " + b"A" * (1 << 20))
                await w.drain()
            await asyncio.sleep(60)

    server = Server({1: msg(1)})
    async with imap_setup(configs, server) as (config, _):
        start = time.monotonic()
        outcome = await poll(config)
    assert time.monotonic() - start < IO_TIMEOUT + 3
    assert isinstance(outcome.error, TemporaryError), outcome.line()


@pytest.mark.parametrize("caps", [b"IMAP4rev1 UIDPLUS", b"IMAP4rev1 AUTH=PLAIN SASL-IR"])
async def test_imap_wrong_tag_on_login_does_not_leak_the_password(
    configs: ConfigWriter, caplog: pytest.LogCaptureFixture, caps: bytes
) -> None:
    class Server(FakeIMAP):
        async def on_login(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
            w.write(b"X1 NO go away\r\n")

        on_authenticate = on_login

    server = Server({1: msg(1)})
    server.caps = caps
    caplog.set_level(logging.DEBUG)
    async with imap_setup(configs, server) as (config, _):
        outcome = await poll(config)
    assert isinstance(outcome.error, FetchdError), outcome.line()
    assert_no_secret(outcome, caplog)


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"NO [AUTHENTICATIONFAILED] bad\r\n", PermanentError),
        (b"NO [UNAVAILABLE] try later\r\n", TemporaryError),
        (b"BAD what\r\n", PermanentError),
    ],
)
async def test_imap_login_errors_do_not_leak(
    configs: ConfigWriter, caplog: pytest.LogCaptureFixture, reply: bytes, error: type
) -> None:
    class Server(FakeIMAP):
        async def on_login(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
            w.write(tag + b" " + reply)

    server = Server({1: msg(1)})
    caplog.set_level(logging.DEBUG)
    async with imap_setup(configs, server) as (config, _):
        outcome = await poll(config)
    assert type(outcome.error) is error, outcome.line()
    assert_no_secret(outcome, caplog)


async def test_imap_store_refused_keeps_state_and_retries(configs: ConfigWriter) -> None:
    class Server(FakeIMAP):
        refuse = True

        async def on_uid_store(self, w: asyncio.StreamWriter, tag: bytes, args: list[bytes]) -> Any:
            if self.refuse:
                w.write(tag + b" NO read-only\r\n")
            else:
                await super().on_uid_store(w, tag, args)

    server = Server({1: msg(1)})
    async with imap_setup(configs, server) as (config, sink):
        first = await poll(config)
        assert isinstance(first.error, TemporaryError), first.line()
        server.refuse = False
        second = await poll(config)
    assert second.ok, second.line()
    assert bodies(sink) == [msg(1)] and server.mailbox == {}


# ---------------------------------------------------------------------------------------------
# the MTA side


@asynccontextmanager
async def fake_mta(script: Callable[[bytes], bytes | None]) -> AsyncIterator[int]:
    """An SMTP server answering each line via `script`; None means 'say nothing'."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mta ready\r\n")
        in_data = False
        while line := await reader.readline():
            if in_data:
                if line != b".\r\n":
                    continue
                in_data = False
                key = b"."
            else:
                key = line.split()[0].upper() if line.split() else b""
            reply = script(key)
            if reply == b"CLOSE":
                return
            if reply is None:
                await asyncio.sleep(60)
                return
            writer.write(reply)
            await writer.drain()
            if key == b"DATA" and reply.startswith(b"354"):
                in_data = True
            if key == b"QUIT":
                return

    async with serve(handler) as port:
        yield port


def normal_smtp(key: bytes) -> bytes:
    return {
        b"EHLO": b"250-mta\r\n250 8BITMIME\r\n",
        b"DATA": b"354 go\r\n",
        b"QUIT": b"221 bye\r\n",
    }.get(key, b"250 ok\r\n")


@pytest.mark.parametrize(
    "after_dot",
    [b"CLOSE", b"421 4.3.2 shutting down\r\n", None, b"452 4.3.1 full\r\n"],
    ids=["drop", "421", "silent", "452"],
)
async def test_mta_trouble_after_the_dot_keeps_the_message(
    configs: ConfigWriter, after_dot: bytes | None
) -> None:
    server = FakePOP3([(b"u1", msg(1)), (b"u2", msg(2))])

    def script(key: bytes) -> bytes | None:
        return after_dot if key == b"." else normal_smtp(key)

    async with fake_mta(script) as smtp_port, serve(server.handle) as port:
        start = time.monotonic()
        outcome = await poll(write_config(configs, "pop3", port, smtp_port))
    assert time.monotonic() - start < 3 + IO_TIMEOUT + 2
    assert isinstance(outcome.error, DeliveryDeferred), outcome.line()
    assert len(server.mailbox) == 2 and not server.sent(b"DELE")


@pytest.mark.parametrize(
    "script",
    [
        lambda k: None,  # never greets back to EHLO
        lambda k: b"421 4.3.2 go away\r\n" if k == b"EHLO" else normal_smtp(k),
        lambda k: b"CLOSE",
    ],
    ids=["silent-ehlo", "421-ehlo", "closes"],
)
async def test_mta_unusable_from_the_start(
    configs: ConfigWriter, script: Callable[[bytes], bytes | None]
) -> None:
    server = FakeIMAP({1: msg(1)})
    async with fake_mta(script) as smtp_port, serve(server.handle) as port:
        start = time.monotonic()
        outcome = await poll(write_config(configs, "imap", port, smtp_port))
    assert time.monotonic() - start < 3 + IO_TIMEOUT + 2
    assert isinstance(outcome.error, DeliveryDeferred), outcome.line()
    assert server.mailbox != {} and not server.sent(b"STORE")


async def test_mta_down(configs: ConfigWriter) -> None:
    server = FakePOP3([(b"u1", msg(1))])
    async with serve(server.handle) as port:
        outcome = await poll(write_config(configs, "pop3", port, 1))
    assert isinstance(outcome.error, DeliveryDeferred), outcome.line()
    assert server.mailbox != [] and not server.sent(b"DELE")


async def test_mta_rejects_one_message_others_go_on(configs: ConfigWriter) -> None:
    server = FakePOP3([(b"u1", msg(1)), (b"u2", msg(2)), (b"u3", msg(3))])
    seen = {"n": 0}

    def script(key: bytes) -> bytes | None:
        if key == b".":
            seen["n"] += 1
            return b"554 5.6.0 nope\r\n" if seen["n"] == 2 else b"250 ok\r\n"
        return normal_smtp(key)

    async with fake_mta(script) as smtp_port, serve(server.handle) as port:
        outcome = await poll(write_config(configs, "pop3", port, smtp_port))
    assert outcome.ok, outcome.line()
    assert [b for _, b in server.mailbox] == [msg(2)]


async def test_slow_mta_trickling_reply_is_bounded(configs: ConfigWriter) -> None:
    server = FakePOP3([(b"u1", msg(1))])

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mta\r\n")
        await reader.readline()
        writer.write(b"250 mta\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"DATA"):
                writer.write(b"354 go\r\n")
                while await reader.readline() != b".\r\n":
                    pass
                for _ in range(100):  # a multi-line reply that never ends
                    writer.write(b"250-still thinking\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.5)
                return
            writer.write(b"250 ok\r\n")

    async with serve(handler) as smtp_port, serve(server.handle) as port:
        start = time.monotonic()
        outcome = await poll(write_config(configs, "pop3", port, smtp_port), limit=20)
    assert time.monotonic() - start < 3 + IO_TIMEOUT + 3
    assert isinstance(outcome.error, DeliveryDeferred), outcome.line()
    assert server.mailbox != []


# ---------------------------------------------------------------------------------------------
# accounts do not hurt each other


async def test_a_hanging_account_does_not_block_another(configs: ConfigWriter) -> None:
    class Hanging(FakePOP3):
        async def on_retr(self, w: asyncio.StreamWriter, args: list[bytes]) -> Any:
            w.write(b"+OK\r\n")
            await asyncio.sleep(60)

    class Exploding(FakeIMAP):
        def select_lines(self) -> bytes:
            return b"* OK [UIDVALIDITY %s] boom\r\n" % (b"9" * 30)

    bad, worse, good = (
        Hanging([(b"u1", msg(1))]),
        Exploding({1: msg(9)}),
        FakePOP3([(b"g", msg(2))]),
    )
    async with (
        mta() as sink,
        serve(bad.handle) as p1,
        serve(worse.handle) as p2,
        serve(good.handle) as p3,
    ):
        base: dict[str, Any] = {
            "user": "alice",
            "host": "127.0.0.1",
            "password": SECRET,
            "timeout": IO_TIMEOUT,
            "tls": {"mode": "none", "allow_plaintext": True},
            "deliver": {"smtp": f"127.0.0.1:{sink.port}", "to": ["a@localhost"]},
        }
        config = configs.write(
            [
                {**base, "name": "bad", "protocol": "pop3", "port": p1},
                {**base, "name": "worse", "protocol": "imap", "port": p2},
                {**base, "name": "good", "protocol": "pop3", "port": p3},
            ]
        )
        outcomes = await asyncio.wait_for(poll_once(config), POLL_LIMIT)
    by_name = {o.account.name: o for o in outcomes}
    assert by_name["good"].ok and bodies(sink) == [msg(2)]
    assert isinstance(by_name["bad"].error, TemporaryError)
    assert not by_name["worse"].ok  # whatever the class, it did not take the others down


# ---------------------------------------------------------------------------------------------
# hostile configuration files


def write_raw(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "hostile.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(0o600)
    return path


ACCOUNT = """
  - name: a
    protocol: pop3
    host: 127.0.0.1
    user: u
    password: p
    deliver: {to: [a@localhost]}
"""


def test_config_billion_laughs_is_fast_and_refused(tmp_path: Path) -> None:
    text = (
        "max_connections: 1\nstate_file: &s [\n"
        + ",\n".join(
            [' &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
            + [f" &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
        )
        + "]\naccounts:"
        + ACCOUNT
    )
    start = time.monotonic()
    with pytest.raises(ConfigError, match="state_file"):
        load(write_raw(tmp_path, text))
    assert time.monotonic() - start < 2


def test_config_billion_laughs_in_a_list_key(tmp_path: Path) -> None:
    anchors = ",\n".join(
        [' &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        + [f" &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    )
    text = ("accounts:" + ACCOUNT + "    folders: [" + anchors + "]\n").replace(
        "protocol: pop3", "protocol: imap"
    )
    start = time.monotonic()
    with pytest.raises(ConfigError):
        load(write_raw(tmp_path, text))
    assert time.monotonic() - start < 2


def test_config_recursive_alias_is_a_config_error(tmp_path: Path) -> None:
    text = "defaults: &d\n  tls: *d\naccounts:" + ACCOUNT + "    tls: &e {tls: *e}\n"
    with pytest.raises(ConfigError):
        load(write_raw(tmp_path, text))


def test_config_deep_nesting_is_a_config_error(tmp_path: Path) -> None:
    text = "state_file: " + "[" * 5000 + "]" * 5000 + "\naccounts:" + ACCOUNT
    with pytest.raises(ConfigError):
        load(write_raw(tmp_path, text))


@pytest.mark.parametrize(
    "text",
    [
        b"accounts:\x00" + ACCOUNT.encode(),
        b"\xff\xfe\x00garbage",
        b"accounts:" + ACCOUNT.encode() + b"    port: 1e3\n",
        b"accounts:" + ACCOUNT.encode() + b"    port: 99999999999999999999999999\n",
        b"accounts:" + ACCOUNT.encode() + b"    timeout: .nan\n",
        b"accounts:" + ACCOUNT.encode() + b"    interval: .inf\n",
        b"accounts:" + ACCOUNT.encode() + b"    keep: yes please\n",
        b"accounts:" + ACCOUNT.encode().replace(b"password: p", b"password: !!binary cA=="),
        b"accounts:" + ACCOUNT.encode().replace(b"name: a", b"name: 2020-01-01"),
        b"accounts:" + ACCOUNT.encode().replace(b"user: u", b'user: "u\\0x"'),
        b"accounts:" + ACCOUNT.encode().replace(b"user: u", b"user: [u]"),
        b"accounts:" + ACCOUNT.encode() + b"    deliver: {to: 5}\n",
        b"accounts: [null]\n",
        b"accounts: [[]]\n",
        b"accounts: {a: 1}\n",
        b"? [a]\n: b\naccounts:" + ACCOUNT.encode(),
        b"accounts:" + ACCOUNT.encode() + b"    <<: {keep: true}\n",
        b"!!python/object/apply:os.system ['true']\n",
        b"---\naccounts: []\n---\naccounts: []\n",
    ],
)
def test_config_odd_input_is_a_config_error(tmp_path: Path, text: bytes) -> None:
    with pytest.raises(ConfigError):
        load(write_raw(tmp_path, text))


def test_config_password_with_line_break_is_refused(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path,
        "accounts:" + ACCOUNT.replace("password: p", "password_env: PW"),
    )
    with pytest.raises(ConfigError, match="password"):
        load(path, environ={"PW": "one\r\nDELE 1"})


async def test_password_with_line_break_does_not_inject_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FakePOP3([(b"u1", msg(1))])
    monkeypatch.setenv("PW", "one\r\nDELE 1")
    async with mta() as sink, serve(server.handle) as port:
        text = (
            f"state_file: {tmp_path}/s.db\naccounts:\n  - name: a\n    protocol: pop3\n"
            f"    host: 127.0.0.1\n    port: {port}\n    user: u\n    password_env: PW\n"
            f"    timeout: 2\n    tls: {{mode: none, allow_plaintext: true}}\n"
            f"    deliver: {{smtp: '127.0.0.1:{sink.port}', to: [a@localhost]}}\n"
        )
        path = write_raw(tmp_path, text)
        try:
            load(path)
        except ConfigError:
            return  # refused up front: the best outcome
        (outcome,) = await asyncio.wait_for(poll_once(path), POLL_LIMIT)
    assert not outcome.ok
    assert not server.sent(b"DELE") and b"one" not in server.raw
