"""STARTTLS is fail-closed: scripted hostile servers never see a credential."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from fetchd.errors import PermanentError, ProtocolError, TemporaryError
from tests.conftest import ConfigWriter
from tests.test_interop import poll_once

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
SECRET = "s3cret-password"


@asynccontextmanager
async def fake_server(handler: Handler) -> AsyncIterator[tuple[int, bytearray]]:
    """A loopback server running `handler`; yields its port and every byte it received."""
    received = bytearray()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        class Recording:
            async def readline(self) -> bytes:
                line = await reader.readline()
                received.extend(line)
                return line

        try:
            await handler(Recording(), writer)  # type: ignore[arg-type]
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()


def scripted(greeting: bytes, replies: dict[bytes, bytes]) -> Handler:
    """Answer each command line with the reply of the first matching prefix."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        while line := await reader.readline():
            words = line.split()
            # IMAP lines start with a tag: match on what follows it.
            key = (
                b" ".join(words[1:2])
                if greeting.startswith(b"* ") and words
                else b" ".join(words[:1])
            )
            reply = next((r for p, r in replies.items() if key.upper() == p), None)
            if reply is None:
                reply = (
                    b"%s BAD unexpected\r\n" % words[0]
                    if greeting.startswith(b"* ")
                    else b"-ERR ?\r\n"
                )
            writer.write(reply.replace(b"TAG", words[0] if words else b"*"))
            await writer.drain()

    return handler


def account(configs: ConfigWriter, protocol: str, port: int) -> Path:
    return configs.write(
        [
            {
                "name": "victim",
                "protocol": protocol,
                "host": "localhost",
                "port": port,
                "user": "alice",
                "password": SECRET,
                "timeout": 3,
                "tls": {"mode": "starttls", "ca_file": str(configs.ca_file)},
                "deliver": {"smtp": "127.0.0.1:9", "to": ["alice@localhost"]},
            }
        ]
    )


POP3_CASES = {
    "no STLS offered": (
        {b"CAPA": b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n"},
        PermanentError,
        "does not offer STLS",
    ),
    "STLS refused": (
        {b"CAPA": b"+OK\r\nSTLS\r\nUSER\r\n.\r\n", b"STLS": b"-ERR not now\r\n"},
        PermanentError,
        "refused STLS",
    ),
    "injected reply after STLS": (
        {b"CAPA": b"+OK\r\nSTLS\r\n.\r\n", b"STLS": b"+OK begin TLS\r\n+OK Logged in.\r\n"},
        ProtocolError,
        "injection",
    ),
    "CAPA not understood": ({}, PermanentError, "does not offer STLS"),
}


@pytest.mark.parametrize("case", POP3_CASES)
async def test_pop3_stls_stripping_gets_no_credentials(configs: ConfigWriter, case: str) -> None:
    replies, error, words = POP3_CASES[case]
    async with fake_server(scripted(b"+OK hello\r\n", replies)) as (port, received):
        (outcome,) = await poll_once(account(configs, "pop3", port))
    assert isinstance(outcome.error, error), outcome.line()
    assert words in str(outcome.error)
    assert b"USER" not in received and b"PASS" not in received and b"AUTH" not in received
    assert SECRET.encode() not in received


IMAP_CASES = {
    "PREAUTH greeting": (
        b"* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS] logged in already\r\n",
        {b"CAPABILITY": b"* CAPABILITY IMAP4rev1 STARTTLS\r\nTAG OK done\r\n"},
        PermanentError,
        "PREAUTH",
    ),
    "no STARTTLS offered": (
        b"* OK ready\r\n",
        {b"CAPABILITY": b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nTAG OK done\r\n"},
        PermanentError,
        "does not offer STARTTLS",
    ),
    "STARTTLS refused": (
        b"* OK ready\r\n",
        {
            b"CAPABILITY": b"* CAPABILITY IMAP4rev1 STARTTLS\r\nTAG OK done\r\n",
            b"STARTTLS": b"TAG NO not today\r\n",
        },
        PermanentError,
        "refused STARTTLS",
    ),
    "injected capability after STARTTLS": (
        b"* OK ready\r\n",
        {
            b"CAPABILITY": b"* CAPABILITY IMAP4rev1 STARTTLS\r\nTAG OK done\r\n",
            b"STARTTLS": b"TAG OK begin TLS\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n",
        },
        ProtocolError,
        "injection",
    ),
}


@pytest.mark.parametrize("case", IMAP_CASES)
async def test_imap_starttls_stripping_gets_no_credentials(
    configs: ConfigWriter, case: str
) -> None:
    greeting, replies, error, words = IMAP_CASES[case]
    async with fake_server(scripted(greeting, replies)) as (port, received):
        (outcome,) = await poll_once(account(configs, "imap", port))
    assert isinstance(outcome.error, error), outcome.line()
    assert words in str(outcome.error)
    assert b"LOGIN" not in received and b"AUTHENTICATE" not in received
    assert SECRET.encode() not in received


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_silent_server_times_out(configs: ConfigWriter, protocol: str) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async with fake_server(silent) as (port, received):
        (outcome,) = await asyncio.wait_for(poll_once(account(configs, protocol, port)), 20)
    assert isinstance(outcome.error, TemporaryError)
    assert "3 s" in str(outcome.error)
    assert received == b""
