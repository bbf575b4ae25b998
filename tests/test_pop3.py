"""POP3 in depth: authentication methods, retrieval options, and a big mailbox on Dovecot."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from fetchd.errors import PermanentError
from tests.conftest import ConfigWriter, as_delivered, strip_received
from tests.support.dovecot import Dovecot
from tests.support.sink import Sink, smtp_sink
from tests.test_interop import poll_once

PASSWORD = "s3cret pässword"
TOKEN = "ya29.token-for-alice"
MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


class AuthServer:
    """A POP3 server that checks one authentication method properly, then serves one message."""

    def __init__(self, capa: list[bytes], greeting: bytes = b"+OK ready\r\n") -> None:
        self.capa = capa
        self.greeting = greeting
        self.log: list[bytes] = []
        self.authenticated_by: str | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def line() -> bytes:
            data = await reader.readline()
            self.log.append(data)
            return data.rstrip(b"\r\n")

        writer.write(self.greeting)
        user = b""
        while cmd := await line():
            words = cmd.split(b" ")
            verb = words[0].upper()
            ok = False
            if verb == b"CAPA":
                writer.write(b"+OK\r\n" + b"".join(c + b"\r\n" for c in self.capa) + b".\r\n")
                continue
            if verb == b"USER":
                user = words[1]
                writer.write(b"+OK\r\n")
                continue
            if verb == b"PASS":
                ok = user == b"alice" and cmd[5:].decode() == PASSWORD
                self.authenticated_by = "user" if ok else None
            elif verb == b"APOP":
                stamp = self.greeting.split(b" ")[-1].strip()
                digest = hashlib.md5(stamp + PASSWORD.encode(), usedforsecurity=False).hexdigest()
                digest = digest.encode()
                ok = words[1:] == [b"alice", digest]
                self.authenticated_by = "apop" if ok else None
            elif verb == b"AUTH":
                ok = await self.sasl(words[1].upper(), words[2:], line, writer)
            elif verb == b"UIDL":
                writer.write(b"+OK\r\n1 m1\r\n.\r\n")
                continue
            elif verb == b"LIST":
                writer.write(b"+OK\r\n1 %d\r\n.\r\n" % len(MESSAGE))
                continue
            elif verb == b"RETR":
                writer.write(b"+OK\r\n" + MESSAGE + b".\r\n")
                continue
            elif verb in (b"DELE", b"QUIT"):
                writer.write(b"+OK\r\n")
                if verb == b"QUIT":
                    break
                continue
            writer.write(b"+OK logged in\r\n" if ok else b"-ERR [AUTH] no\r\n")
        writer.close()

    async def sasl(self, mech: bytes, initial: list[bytes], line: Any, writer: Any) -> bool:
        def b64(data: bytes) -> bytes:
            return base64.b64encode(data)

        if mech == b"PLAIN":
            data = base64.b64decode(initial[0]) if initial else None
            if data is None:
                writer.write(b"+ \r\n")
                data = base64.b64decode(await line())
            ok = data == b"\0alice\0" + PASSWORD.encode()
        elif mech == b"LOGIN":
            writer.write(b"+ " + b64(b"Username:") + b"\r\n")
            name = base64.b64decode(await line())
            writer.write(b"+ " + b64(b"Password:") + b"\r\n")
            ok = name == b"alice" and base64.b64decode(await line()) == PASSWORD.encode()
        elif mech == b"CRAM-MD5":
            challenge = b"<1896.697170952@pop.example>"
            writer.write(b"+ " + b64(challenge) + b"\r\n")
            answer = base64.b64decode(await line())
            digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest().encode()
            ok = answer == b"alice " + digest
        elif mech in (b"XOAUTH2", b"OAUTHBEARER"):
            data = base64.b64decode(initial[0])
            ok = f"auth=Bearer {TOKEN}\x01".encode() in data and b"alice" in data
            if not ok:  # RFC 7628: an error challenge, then the client's dummy reply
                error = {"status": "invalid_token", "scope": "https://mail.example/"}
                writer.write(b"+ " + b64(json.dumps(error).encode()) + b"\r\n")
                reply = await line()
                expected = b"" if mech == b"XOAUTH2" else b64(b"\x01")
                if reply != expected:
                    writer.write(b"-ERR protocol violation\r\n")
                    return False
        else:
            return False
        if ok:
            self.authenticated_by = mech.decode().lower()
        return ok


@asynccontextmanager
async def auth_setup(
    configs: ConfigWriter, server: AuthServer, **extra: Any
) -> AsyncIterator[tuple[Path, Sink]]:
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with smtp_sink() as sink:
            account = {
                "name": "alice",
                "protocol": "pop3",
                "host": "127.0.0.1",
                "port": port,
                "user": "alice",
                "password": PASSWORD,
                "timeout": 3,
                "tls": {"mode": "none", "allow_plaintext": True},
                "deliver": {"smtp": f"127.0.0.1:{sink.port}", "to": ["alice@localhost"]},
            }
            account.update(extra)
            yield configs.write([account]), sink
    finally:
        srv.close()


STAMP = b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n"


@pytest.mark.parametrize(
    ("capa", "greeting", "auth", "expected"),
    [
        ([b"USER"], b"+OK ready\r\n", "any", "user"),
        ([b"USER", b"SASL PLAIN LOGIN"], b"+OK ready\r\n", "any", "plain"),
        ([b"USER", b"SASL LOGIN PLAIN CRAM-MD5"], STAMP, "any", "cram-md5"),
        ([b"USER", b"SASL PLAIN"], STAMP, "any", "plain"),  # APOP only with TLS
        ([b"USER", b"SASL PLAIN LOGIN"], b"+OK ready\r\n", "login", "login"),
        ([b"USER", b"SASL PLAIN LOGIN CRAM-MD5"], b"+OK ready\r\n", "user", "user"),
        ([b"SASL XOAUTH2 OAUTHBEARER"], b"+OK ready\r\n", "xoauth2", "xoauth2"),
        ([b"SASL XOAUTH2 OAUTHBEARER"], b"+OK ready\r\n", "oauthbearer", "oauthbearer"),
    ],
)
async def test_authentication_methods(
    configs: ConfigWriter,
    tmp_path: Path,
    capa: list[bytes],
    greeting: bytes,
    auth: str,
    expected: str,
) -> None:
    server = AuthServer(capa, greeting)
    extra: dict[str, Any] = {"auth": auth}
    if auth in ("xoauth2", "oauthbearer"):
        token = tmp_path / "token"
        token.write_text(TOKEN + "\n")
        extra["oauth2"] = {"token_file": str(token)}
    async with auth_setup(configs, server, **extra) as (config, sink):
        (outcome,) = await poll_once(config)
    assert outcome.ok, outcome.line()
    assert server.authenticated_by == expected
    assert [strip_received(a.data)[1] for a in sink.accepted] == [MESSAGE]


@pytest.mark.parametrize("mech", ["xoauth2", "oauthbearer"])
async def test_refused_token_is_reported_with_the_servers_reason(
    configs: ConfigWriter, tmp_path: Path, mech: str
) -> None:
    server = AuthServer([b"SASL XOAUTH2 OAUTHBEARER"])
    script = tmp_path / "token-helper"
    script.write_text("#!/bin/sh\necho expired-token\n")
    script.chmod(0o755)
    async with auth_setup(configs, server, auth=mech, oauth2={"token_command": [str(script)]}) as (
        config,
        sink,
    ):
        (outcome,) = await poll_once(config)
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert "invalid_token" in str(outcome.error) and "https://mail.example/" in str(outcome.error)
    assert "expired-token" not in str(outcome.error)
    assert sink.accepted == []


async def test_apop_over_tls_with_a_checked_timestamp(
    configs: ConfigWriter, tmp_path: Path
) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    for greeting, expected in ((STAMP, "apop"), (b"+OK ready <bad timestamp>\r\n", "user")):
        server = AuthServer([b"USER"], greeting)
        srv = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=ctx)
        port = srv.sockets[0].getsockname()[1]
        async with smtp_sink() as sink:
            config = configs.write(
                [
                    {
                        "name": "alice",
                        "protocol": "pop3",
                        "host": "localhost",
                        "port": port,
                        "user": "alice",
                        "password": PASSWORD,
                        "tls": {"mode": "implicit", "ca_file": str(ca_file)},
                        "deliver": {"smtp": f"127.0.0.1:{sink.port}", "to": ["a@localhost"]},
                    }
                ]
            )
            (outcome,) = await poll_once(config)
        srv.close()
        assert outcome.ok, outcome.line()
        assert server.authenticated_by == expected


async def test_unexpected_challenge_is_cancelled(configs: ConfigWriter) -> None:
    class Odd(AuthServer):
        async def sasl(self, mech: bytes, initial: list[bytes], line: Any, writer: Any) -> bool:
            writer.write(b"+ not base64 at all!\r\n")
            self.cancel = await line()
            return False

    server = Odd([b"SASL CRAM-MD5"])
    async with auth_setup(configs, server, auth="cram-md5") as (config, _):
        (outcome,) = await poll_once(config)
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert server.cancel == b"*"


# -- options, on Dovecot --------------------------------------------------------------------


def pop3_account(
    configs: ConfigWriter, dovecot: Dovecot, user: str, port: int, **extra: Any
) -> Path:
    return configs.write(
        [configs.account(dovecot, user, protocol="pop3", mode="implicit", sink_port=port, **extra)]
    )


async def test_limit_skips_with_one_warning_or_deletes(
    dovecot: Dovecot,
    mailbox_user: str,
    sink: Sink,
    configs: ConfigWriter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    big = b"Subject: big\n\n" + b"x" * 5000 + b"\n"
    dovecot.deliver(mailbox_user, [b"Subject: small\n\nsmall\n", big])
    config = pop3_account(configs, dovecot, mailbox_user, sink.port, limit=1000)
    await poll_once(config)
    await poll_once(config)
    assert [b"small" in a.data for a in sink.accepted] == [True]
    assert caplog.text.count("over the limit of 1000") == 1, "one warning per message"
    assert dovecot.count(mailbox_user) == 1
    config = pop3_account(configs, dovecot, mailbox_user, sink.port, limit=1000, limit_delete=True)
    (outcome,) = await poll_once(config)
    assert outcome.ok and dovecot.count(mailbox_user) == 0
    assert len(sink.accepted) == 1, "an oversized message is deleted, not delivered"


async def test_fetch_limit_and_expunge_every(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter
) -> None:
    dovecot.deliver(mailbox_user, [f"Subject: {i}\n\n{i}\n".encode() for i in range(7)])
    config = pop3_account(configs, dovecot, mailbox_user, sink.port, fetch_limit=3)
    (outcome,) = await poll_once(config)
    assert outcome.ok and len(sink.accepted) == 3 and dovecot.count(mailbox_user) == 4
    logins = dovecot.log().count(f"Login: user=<{mailbox_user}>")
    config = pop3_account(configs, dovecot, mailbox_user, sink.port, expunge_every=2)
    (outcome,) = await poll_once(config)
    assert outcome.ok, outcome.line()
    assert len(sink.accepted) == 7 and dovecot.count(mailbox_user) == 0
    assert dovecot.log().count(f"Login: user=<{mailbox_user}>") - logins == 2, "QUIT every 2"


async def test_delete_after_days_and_fetch_all(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: old\n\nold\n"])
    config = pop3_account(configs, dovecot, mailbox_user, sink.port, keep=True, delete_after_days=2)
    await poll_once(config)
    assert dovecot.count(mailbox_user) == 1
    dovecot.deliver(mailbox_user, [b"Subject: new\n\nnew\n"])
    db = sqlite3.connect(configs.directory / "state.sqlite3")
    with db:  # the first message was delivered three days ago
        db.execute("UPDATE seen SET delivered_at=?", (time.time() - 3 * 86400,))
    db.close()
    (outcome,) = await poll_once(config)
    assert outcome.ok and dovecot.count(mailbox_user) == 1, "the old one is gone, the new stays"
    assert len(sink.accepted) == 2
    config = pop3_account(configs, dovecot, mailbox_user, sink.port, keep=True, fetch_all=True)
    await poll_once(config)
    assert len(sink.accepted) == 3, "fetch_all delivers the kept message again"


async def test_big_mailbox_and_a_10_mb_message_over_pop3s(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter
) -> None:
    messages = [
        b"Message-ID: <%d@big.test>\nSubject: %d\n\nbody %d\n" % (i, i, i) for i in range(5000)
    ]
    huge = b"Subject: huge\n\n" + (b"0123456789" * 99 + b"\n") * 10_500
    dovecot.deliver(mailbox_user, [*messages, huge])
    config = pop3_account(configs, dovecot, mailbox_user, sink.port)
    (outcome,) = await asyncio.wait_for(poll_once(config), 300)
    assert outcome.ok, outcome.line()
    assert len(sink.accepted) == 5001 and dovecot.count(mailbox_user) == 0
    bodies = {strip_received(a.data)[1] for a in sink.accepted}
    assert as_delivered(huge) in bodies and len(as_delivered(huge)) > 10_000_000
    assert all(as_delivered(m) in bodies for m in messages[::97])
