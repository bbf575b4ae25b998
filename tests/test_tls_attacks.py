"""Attacks on fetchd's TLS promises: credentials to an untrusted server, certificates that should
be refused, downgrades, secrets in errors, hangs during TLS and misleading errors.

Each test scripts a hostile peer on 127.0.0.1; those that once exposed a weakness stay as
regression tests. Every poll runs with short account timeouts and under asyncio.wait_for.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import logging
import ssl
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from fetchd.config import TLSSettings, load
from fetchd.errors import (
    ConfigError,
    FetchdError,
    PermanentError,
    ProtocolError,
    TemporaryError,
)
from fetchd.probe import probe
from fetchd.supervisor import Outcome
from tests.conftest import ConfigWriter
from tests.support.sink import smtp_sink
from tests.test_interop import poll_once

SECRET = "Att4ck-s3cret-pw"
TOKEN = base64.b64encode(f"\0alice\0{SECRET}".encode()).decode()
IO_TIMEOUT = 2
POLL_LIMIT = 15.0
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


# ---------------------------------------------------------------------------------------------
# plumbing: a scripted peer that can speak plaintext, then TLS, and records everything


@dataclass
class Peer:
    """What one scripted server saw, over all its connections."""

    received: bytearray = field(default_factory=bytearray)
    handshakes: int = 0
    connections: int = 0
    sni: list[str | None] = field(default_factory=list)

    @property
    def got_credentials(self) -> bool:
        words = (SECRET.encode(), TOKEN.encode(), b"PASS ", b"LOGIN ", b"AUTHENTICATE", b"AUTH ")
        return any(w in self.received for w in words)


class Conn:
    """One server-side connection: read lines, write bytes, upgrade to TLS."""

    def __init__(self, peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.peer = peer
        self.reader = reader
        self.writer = writer

    async def line(self) -> bytes:
        data = await self.reader.readline()
        self.peer.received.extend(data)
        return data

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def tls(self, ctx: ssl.SSLContext) -> None:
        await self.writer.start_tls(ctx)
        self.peer.handshakes += 1


Script = Callable[[Conn], Awaitable[None]]


@asynccontextmanager
async def serve(script: Script) -> AsyncIterator[tuple[int, Peer]]:
    peer = Peer()
    tasks: set[asyncio.Task[Any]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        peer.connections += 1
        try:
            await script(Conn(peer, reader, writer))
        except (ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            tasks.discard(task)
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], peer
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def server_ctx(leaf: trustme.LeafCert, peer: Peer | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    if peer is not None:

        def record(_obj: Any, name: str | None, _ctx: Any) -> None:
            peer.sni.append(name)

        ctx.sni_callback = record
    return ctx


def der_of(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def spki_pin(der: bytes) -> str:
    spki = (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return "pin-sha256:" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


def account(configs: ConfigWriter, protocol: str, port: int, **extra: Any) -> dict[str, Any]:
    tls = {"mode": "starttls", "ca_file": str(configs.ca_file)}
    tls.update(extra.pop("tls", {}))
    acc: dict[str, Any] = {
        "name": "victim",
        "protocol": protocol,
        "host": "localhost",
        "port": port,
        "user": "alice",
        "password": SECRET,
        "timeout": IO_TIMEOUT,
        "tls": tls,
        "deliver": {"smtp": "127.0.0.1:9", "to": ["alice@localhost"]},
    }
    acc.update(extra)
    return acc


async def poll(configs: ConfigWriter, *accounts: dict[str, Any]) -> Outcome:
    (outcome,) = await asyncio.wait_for(poll_once(configs.write(list(accounts))), POLL_LIMIT)
    return outcome


def assert_no_secret_shown(outcome: Outcome, caplog: pytest.LogCaptureFixture) -> None:
    texts = [outcome.line(), str(outcome.error)] + [r.getMessage() for r in caplog.records]
    for text in texts:
        assert SECRET not in text, text
        assert TOKEN not in text, text


@pytest.fixture(scope="module")
def leaf(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("localhost", "127.0.0.1")


# -- scripted POP3 / IMAP servers -------------------------------------------------------------

POP3_CAPS = b"+OK\r\nUSER\r\nUIDL\r\nSTLS\r\n.\r\n"
IMAP_CAPS = b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR\r\n"


def pop3(
    ctx: ssl.SSLContext | None,
    *,
    caps: bytes = POP3_CAPS,
    tls_caps: bytes = b"+OK\r\nUSER\r\nUIDL\r\n.\r\n",
    stls_reply: bytes = b"+OK begin TLS\r\n",
    after_stls: Callable[[Conn], Awaitable[None]] | None = None,
    pass_reply: bytes = b"-ERR [AUTH] no\r\n",
    implicit: bool = False,
) -> Script:
    """A POP3 server: STLS (or implicit TLS), then refuses every login with `pass_reply`."""

    async def script(c: Conn) -> None:
        secured = False
        if implicit:
            assert ctx is not None
            await c.tls(ctx)
            secured = True
        await c.send(b"+OK hello\r\n")
        while line := await c.line():
            cmd = line.split()[0].upper() if line.split() else b""
            if cmd == b"CAPA":
                await c.send(tls_caps if secured else caps)
            elif cmd == b"STLS":
                await c.send(stls_reply)
                if after_stls is not None:
                    await after_stls(c)
                assert ctx is not None
                await c.tls(ctx)
                secured = True
            elif cmd == b"USER":
                await c.send(b"+OK\r\n")
            elif cmd in (b"PASS", b"AUTH"):
                await c.send(pass_reply)
            elif cmd == b"QUIT":
                await c.send(b"+OK bye\r\n")
                return
            else:
                await c.send(b"-ERR ?\r\n")

    return script


def imap(
    ctx: ssl.SSLContext | None,
    *,
    greeting: bytes = b"* OK ready\r\n",
    caps: bytes = IMAP_CAPS,
    tls_caps: bytes = b"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR\r\n",
    starttls_reply: bytes = b"TAG OK begin TLS\r\n",
    after_starttls: Callable[[Conn], Awaitable[None]] | None = None,
    login_reply: bytes = b"TAG NO [AUTHENTICATIONFAILED] no\r\n",
    implicit: bool = False,
) -> Script:
    """An IMAP server: STARTTLS (or implicit TLS), then refuses every login."""

    async def script(c: Conn) -> None:
        secured = False
        if implicit:
            assert ctx is not None
            await c.tls(ctx)
            secured = True
        await c.send(greeting)
        while line := await c.line():
            words = line.split()
            if len(words) < 2:
                await c.send(b"* BAD ?\r\n")
                continue
            tag, cmd = words[0], words[1].upper()
            if cmd == b"CAPABILITY":
                await c.send((tls_caps if secured else caps) + tag + b" OK done\r\n")
            elif cmd == b"STARTTLS":
                await c.send(starttls_reply.replace(b"TAG", tag))
                if after_starttls is not None:
                    await after_starttls(c)
                assert ctx is not None
                await c.tls(ctx)
                secured = True
            elif cmd in (b"LOGIN", b"AUTHENTICATE"):
                if cmd == b"AUTHENTICATE" and len(words) == 3:
                    await c.send(b"+ \r\n")
                    await c.line()
                await c.send(login_reply.replace(b"TAG", tag))
            elif cmd == b"LOGOUT":
                await c.send(b"* BYE\r\n" + tag + b" OK bye\r\n")
                return
            else:
                await c.send(tag + b" BAD ?\r\n")

    return script


# ---------------------------------------------------------------------------------------------
# STARTTLS injection and stripping


async def test_imap_starttls_ok_ending_in_a_literal_smuggles_plaintext_past_the_guard(
    configs: ConfigWriter, leaf: trustme.LeafCert
) -> None:
    """The tagged STARTTLS OK ends in ``{5}``: aioimaplib takes the next five bytes as a literal
    without passing them through ``_handle_line``, so ``injected`` stays False; and when the
    literal is incomplete, ``incomplete_line`` stays empty. The plaintext bytes are accepted."""

    async with serve(imap(server_ctx(leaf), starttls_reply=b"TAG OK begin TLS {5}\r\nABCDE")) as (
        port,
        peer,
    ):
        outcome = await poll(configs, account(configs, "imap", port))
    assert isinstance(outcome.error, ProtocolError), outcome.line()
    assert "injection" in str(outcome.error), outcome.line()
    assert peer.handshakes == 0, "TLS was started although plaintext followed the OK"
    assert not peer.got_credentials


IMAP_INJECTIONS = {
    # untagged data glued to the tagged OK in the same segment
    "same segment": (b"TAG OK go\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n", None),
    # a partial line after the OK
    "partial line": (b"TAG OK go\r\n* CAPAB", None),
    # the OK, then plaintext in a later TCP segment, before the client's ClientHello
    "separate segment": (b"TAG OK go\r\n", b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n"),
    # a fake tagged completion for the next command, sent in plaintext
    "fake next tag": (b"TAG OK go\r\n", b"A0002 OK LOGIN completed\r\n"),
}


@pytest.mark.parametrize("case", IMAP_INJECTIONS)
async def test_imap_starttls_injection_is_refused(
    configs: ConfigWriter, leaf: trustme.LeafCert, case: str
) -> None:
    reply, later = IMAP_INJECTIONS[case]

    async def inject(c: Conn) -> None:
        if later is not None:
            await asyncio.sleep(0.05)
            await c.send(later)

    async with serve(imap(server_ctx(leaf), starttls_reply=reply, after_starttls=inject)) as (
        port,
        peer,
    ):
        outcome = await poll(configs, account(configs, "imap", port))
    assert isinstance(outcome.error, TemporaryError | PermanentError), outcome.line()
    assert not peer.got_credentials


POP3_INJECTIONS = {
    "same segment": (b"+OK go\r\n+OK logged in\r\n", None),
    "partial line": (b"+OK go\r\n+OK", None),
    "separate segment": (b"+OK go\r\n", b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n"),
}


@pytest.mark.parametrize("case", POP3_INJECTIONS)
async def test_pop3_stls_injection_is_refused(
    configs: ConfigWriter, leaf: trustme.LeafCert, case: str
) -> None:
    reply, later = POP3_INJECTIONS[case]

    async def inject(c: Conn) -> None:
        if later is not None:
            await asyncio.sleep(0.05)
            await c.send(later)

    async with serve(pop3(server_ctx(leaf), stls_reply=reply, after_stls=inject)) as (port, peer):
        outcome = await poll(configs, account(configs, "pop3", port))
    assert isinstance(outcome.error, TemporaryError | PermanentError), outcome.line()
    assert not peer.got_credentials


async def test_imap_untagged_capabilities_before_starttls_ok_are_forgotten(
    configs: ConfigWriter, leaf: trustme.LeafCert
) -> None:
    """Plaintext claims AUTH=PLAIN (before the tagged OK); after TLS the server says
    LOGINDISABLED and offers no PLAIN: nothing may be sent."""
    async with serve(
        imap(
            server_ctx(leaf),
            starttls_reply=b"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR\r\nTAG OK go\r\n",
            tls_caps=b"* CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=GSSAPI\r\n",
        )
    ) as (port, peer):
        outcome = await poll(configs, account(configs, "imap", port))
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert "LOGIN" in str(outcome.error), outcome.line()
    assert peer.handshakes == 1
    assert not peer.got_credentials


async def test_pop3_plaintext_capabilities_do_not_choose_the_login_method(
    configs: ConfigWriter, leaf: trustme.LeafCert
) -> None:
    """Plaintext CAPA offers only SASL PLAIN; the secured CAPA offers USER: USER/PASS is used."""
    async with serve(
        pop3(
            server_ctx(leaf),
            caps=b"+OK\r\nSASL PLAIN\r\nSTLS\r\n.\r\n",
            tls_caps=b"+OK\r\nUSER\r\nUIDL\r\n.\r\n",
        )
    ) as (port, peer):
        outcome = await poll(configs, account(configs, "pop3", port))
    assert "login failed" in str(outcome.error), outcome.line()
    assert b"USER alice" in peer.received and b"AUTH " not in peer.received


async def test_imap_starttls_only_after_login_gets_nothing(configs: ConfigWriter) -> None:
    async with serve(imap(None, caps=b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n")) as (port, peer):
        outcome = await poll(configs, account(configs, "imap", port))
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert "does not offer STARTTLS" in str(outcome.error)
    assert not peer.got_credentials


async def test_imap_ok_greeting_mentioning_preauth_is_not_preauth(
    configs: ConfigWriter, leaf: trustme.LeafCert
) -> None:
    greeting = b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready (PREAUTH not offered)\r\n"
    async with serve(imap(server_ctx(leaf), greeting=greeting)) as (port, peer):
        outcome = await poll(configs, account(configs, "imap", port))
    assert "PREAUTH" not in str(outcome.error), outcome.line()
    assert peer.handshakes == 1


# ---------------------------------------------------------------------------------------------
# hangs during TLS


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_implicit_tls_server_that_never_answers_the_hello(
    configs: ConfigWriter, protocol: str
) -> None:
    async def mute(c: Conn) -> None:
        await asyncio.sleep(60)

    async with serve(mute) as (port, peer):
        outcome = await poll(configs, account(configs, protocol, port, tls={"mode": "implicit"}))
    assert isinstance(outcome.error, TemporaryError), outcome.line()
    assert not peer.got_credentials


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_starttls_handshake_that_stalls_is_bounded(
    configs: ConfigWriter, leaf: trustme.LeafCert, protocol: str
) -> None:
    async def stall(c: Conn) -> None:
        await asyncio.sleep(60)

    script = (
        pop3(server_ctx(leaf), after_stls=stall)
        if protocol == "pop3"
        else imap(server_ctx(leaf), after_starttls=stall)
    )
    async with serve(script) as (port, peer):
        outcome = await poll(configs, account(configs, protocol, port))
    assert isinstance(outcome.error, TemporaryError), outcome.line()
    assert not peer.got_credentials


async def test_pop3_stalled_stls_handshake_says_it_timed_out(
    configs: ConfigWriter, leaf: trustme.LeafCert
) -> None:
    async def stall(c: Conn) -> None:
        await asyncio.sleep(60)

    async with serve(pop3(server_ctx(leaf), after_stls=stall)) as (port, _):
        outcome = await poll(configs, account(configs, "pop3", port))
    text = str(outcome.error)
    assert "TLS versions" not in text, text
    assert "timed out" in text or "within" in text, text


# ---------------------------------------------------------------------------------------------
# names: SNI, server_name, IP addresses, trailing dots


@pytest.mark.parametrize(
    ("protocol", "mode"),
    [("pop3", "implicit"), ("pop3", "starttls"), ("imap", "implicit"), ("imap", "starttls")],
)
async def test_server_name_is_sent_as_sni_and_checked(
    configs: ConfigWriter, ca: trustme.CA, protocol: str, mode: str
) -> None:
    """host is an address, server_name a name: SNI carries the name, the name is checked."""
    cert = ca.issue_cert("mail.example.test")

    def make(implicit: bool) -> Script:
        async def script(c: Conn) -> None:
            inner = (pop3 if protocol == "pop3" else imap)(
                server_ctx(cert, c.peer), implicit=implicit
            )
            await inner(c)

        return script

    async with serve(make(mode == "implicit")) as (port, peer):
        outcome = await poll(
            configs,
            account(
                configs,
                protocol,
                port,
                host="127.0.0.1",
                tls={"mode": mode, "server_name": "mail.example.test"},
            ),
        )
    assert "login failed" in str(outcome.error), outcome.line()
    assert peer.sni == ["mail.example.test"]

    # the same server_name, but the certificate is for another name: refused
    cert = ca.issue_cert("other.example.test")
    async with serve(make(mode == "implicit")) as (port, peer):
        outcome = await poll(
            configs,
            account(
                configs,
                protocol,
                port,
                host="127.0.0.1",
                tls={"mode": mode, "server_name": "mail.example.test"},
            ),
        )
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert "not for mail.example.test" in str(outcome.error), outcome.line()
    assert not peer.got_credentials


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_ip_host_sends_no_sni(
    configs: ConfigWriter, leaf: trustme.LeafCert, protocol: str
) -> None:
    async def script(c: Conn) -> None:
        await (pop3 if protocol == "pop3" else imap)(server_ctx(leaf, c.peer))(c)

    async with serve(script) as (port, peer):
        outcome = await poll(configs, account(configs, protocol, port, host="127.0.0.1"))
    assert "login failed" in str(outcome.error), outcome.line()
    assert peer.sni == [None]  # RFC 6066: no IP addresses in SNI


async def test_trailing_dot_host_matches_its_certificate(
    configs: ConfigWriter, leaf: trustme.LeafCert
) -> None:
    async with serve(imap(server_ctx(leaf), implicit=True)) as (port, _):
        # host 127.0.0.1 so that no resolver is involved; the name is the fully qualified one
        tls = {"mode": "implicit", "server_name": "localhost."}
        outcome = await poll(configs, account(configs, "imap", port, host="127.0.0.1", tls=tls))
    assert "login failed" in str(outcome.error), outcome.line()


# ---------------------------------------------------------------------------------------------
# versions


@pytest.mark.parametrize("sslproto", [None, "auto", "tls", "tls1.2+"])
async def test_tls11_server_is_refused_by_default_and_by_fetchmail_words(
    configs: ConfigWriter, leaf: trustme.LeafCert, sslproto: str | None
) -> None:
    ctx = server_ctx(leaf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    tls: dict[str, Any] = {"mode": "implicit"}
    if sslproto:
        tls["sslproto"] = sslproto
    async with serve(pop3(ctx, implicit=True)) as (port, peer):
        outcome = await poll(configs, account(configs, "pop3", port, tls=tls))
    assert outcome.error is not None, outcome.line()
    assert not peer.got_credentials


def test_sslproto_ssl23_is_accepted_as_documented(configs: ConfigWriter) -> None:
    path = configs.write(
        [account(configs, "imap", 993, tls={"mode": "implicit", "sslproto": "SSL23"})]
    )
    cfg = load(path)
    assert cfg.accounts[0].tls.min_version == "TLSv1.2"


@pytest.mark.parametrize(
    "tls",
    [
        {"sslproto": "ssl3"},
        {"sslproto": "SSLv3"},
        {"min_version": "ssl3"},
        {"sslproto": "bogus"},
        {"fingerprints": []},
        {"sslfingerprint": ""},
        {"fingerprints": ["sha256:" + "AB" * 20]},  # a SHA-1 length under a sha256 label
        {"fingerprints": ["pin-sha256:" + base64.b64encode(b"x" * 31).decode()]},
        {"mode": "none"},  # plaintext without allow_plaintext
        {"sslproto": ""},
        {"sslcertck": "no"},  # a string, not a boolean
        {"verify": "false"},
    ],
)
def test_weakening_or_broken_tls_settings_are_config_errors(
    configs: ConfigWriter, tls: dict[str, Any]
) -> None:
    settings = {"mode": "implicit", **tls}
    path = configs.write([account(configs, "imap", 993, tls=settings)])
    with pytest.raises(ConfigError):
        load(path)


def test_fetchmail_aliases_keep_verification_on(configs: ConfigWriter) -> None:
    path = configs.write(
        [
            account(
                configs,
                "imap",
                993,
                tls={"mode": "implicit", "sslcertck": True, "sslproto": "tls1.2+"},
            )
        ]
    )
    tls = load(path).accounts[0].tls
    assert tls.verify and tls.min_version == "TLSv1.2"


# ---------------------------------------------------------------------------------------------
# pins


async def test_pin_with_lowercased_base64_is_a_different_pin(
    configs: ConfigWriter, leaf: trustme.LeafCert
) -> None:
    """Base64 is case sensitive: a lowercased SPKI pin must not match (or be accepted)."""
    pin = spki_pin(der_of(leaf))
    wrong = "pin-sha256:" + pin.split(":", 1)[1].lower()
    if wrong == pin:
        pytest.skip("pin has no letters")
    async with serve(pop3(server_ctx(leaf), implicit=True)) as (port, peer):
        try:
            outcome = await poll(
                configs,
                account(
                    configs,
                    "pop3",
                    port,
                    tls={"mode": "implicit", "verify": False, "fingerprints": [wrong]},
                ),
            )
        except ConfigError:
            return  # refused as malformed: also fine
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert "fingerprint mismatch" in str(outcome.error)
    assert not peer.got_credentials


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_pin_of_the_issuing_ca_does_not_admit_any_leaf(
    configs: ConfigWriter, ca: trustme.CA, protocol: str
) -> None:
    """Pinning the CA's fingerprint with verify: false must not accept an arbitrary leaf."""
    ca_der = ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode())
    pin = "sha256:" + hashlib.sha256(ca_der).hexdigest()
    stranger = trustme.CA().issue_cert("localhost")
    async with serve(
        (pop3 if protocol == "pop3" else imap)(server_ctx(stranger), implicit=True)
    ) as (port, peer):
        outcome = await poll(
            configs,
            account(
                configs,
                protocol,
                port,
                tls={"mode": "implicit", "verify": False, "fingerprints": [pin]},
            ),
        )
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert not peer.got_credentials


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_pin_mismatch_is_enforced_on_starttls_with_verification_off(
    configs: ConfigWriter, leaf: trustme.LeafCert, protocol: str
) -> None:
    other = spki_pin(der_of(trustme.CA().issue_cert("localhost")))
    script = (pop3 if protocol == "pop3" else imap)(server_ctx(leaf))
    async with serve(script) as (port, peer):
        outcome = await poll(
            configs,
            account(configs, protocol, port, tls={"verify": False, "fingerprints": [other]}),
        )
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert "fingerprint mismatch" in str(outcome.error)
    assert peer.handshakes == 1 and not peer.got_credentials


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_explaining_a_refused_certificate_never_logs_in(
    configs: ConfigWriter, ca: trustme.CA, protocol: str
) -> None:
    """The _explain re-connection (unverified context) reads the certificate and closes."""
    expired = ca.issue_cert("localhost", not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    script = (pop3 if protocol == "pop3" else imap)(server_ctx(expired))
    async with serve(script) as (port, peer):
        outcome = await poll(configs, account(configs, protocol, port))
    assert "expired on" in str(outcome.error), outcome.line()
    assert peer.connections == 2  # the refused one, then the one that reads the certificate
    assert not peer.got_credentials


# ---------------------------------------------------------------------------------------------
# verify: false warnings


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_verify_false_warns_at_every_connect(
    configs: ConfigWriter,
    leaf: trustme.LeafCert,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
) -> None:
    caplog.set_level(logging.WARNING)
    script = (pop3 if protocol == "pop3" else imap)(server_ctx(leaf), implicit=True)
    async with serve(script) as (port, _):
        acc = account(configs, protocol, port, tls={"mode": "implicit", "verify": False})
        await poll(configs, acc)
        await poll(configs, acc)
    warned = [r for r in caplog.records if "NOT verified" in r.getMessage()]
    assert len(warned) == 2, [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------------------------------------
# CRLs


def make_crl(issuer: trustme.CA, revoked: list[trustme.LeafCert | trustme.CA]) -> bytes:
    key = serialization.load_pem_private_key(issuer.private_key_pem.bytes(), None)
    name = x509.load_pem_x509_certificate(issuer.cert_pem.bytes()).subject
    builder = x509.CertificateRevocationListBuilder().issuer_name(name)
    builder = builder.last_update(NOW - DAY).next_update(NOW + DAY)
    for item in revoked:
        pem = item.cert_chain_pems[0] if isinstance(item, trustme.LeafCert) else item.cert_pem
        serial = x509.load_pem_x509_certificate(pem.bytes()).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(NOW - DAY)
            .build()
        )
    crl = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    return crl.public_bytes(serialization.Encoding.PEM)


async def test_a_ca_certificate_in_the_crl_file_is_not_trusted(
    configs: ConfigWriter, ca: trustme.CA, tmp_path: Path
) -> None:
    evil = trustme.CA(organization_name="Evil CA")
    crl = tmp_path / "ca.crl"
    crl.write_bytes(make_crl(ca, []) + make_crl(evil, []) + evil.cert_pem.bytes())
    async with serve(pop3(server_ctx(evil.issue_cert("localhost")), implicit=True)) as (
        port,
        peer,
    ):
        outcome = await poll(
            configs,
            account(configs, "pop3", port, tls={"mode": "implicit", "crl_file": str(crl)}),
        )
    assert isinstance(outcome.error, ConfigError | PermanentError), outcome.line()
    assert "holds certificates" in str(outcome.error), outcome.line()
    assert not peer.got_credentials


async def test_crl_chain_refuses_a_revoked_intermediate(
    configs: ConfigWriter, ca: trustme.CA, tmp_path: Path
) -> None:
    inter = ca.create_child_ca()
    leaf = inter.issue_cert("localhost")
    crl = tmp_path / "chain.crl"
    crl.write_bytes(make_crl(ca, [inter]) + make_crl(inter, []))
    async with serve(imap(server_ctx(leaf), implicit=True)) as (port, peer):
        outcome = await poll(
            configs,
            account(
                configs,
                "imap",
                port,
                tls={"mode": "implicit", "crl_file": str(crl), "crl_check": "chain"},
            ),
        )
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert "revoked" in str(outcome.error), outcome.line()
    assert not peer.got_credentials


async def test_crl_chain_without_the_roots_crl_is_refused(
    configs: ConfigWriter, ca: trustme.CA, tmp_path: Path
) -> None:
    inter = ca.create_child_ca()
    leaf = inter.issue_cert("localhost")
    crl = tmp_path / "leaf-only.crl"
    crl.write_bytes(make_crl(inter, []))
    async with serve(imap(server_ctx(leaf), implicit=True)) as (port, peer):
        outcome = await poll(
            configs,
            account(
                configs,
                "imap",
                port,
                tls={"mode": "implicit", "crl_file": str(crl), "crl_check": "chain"},
            ),
        )
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert "CRL" in str(outcome.error), outcome.line()
    assert not peer.got_credentials


# ---------------------------------------------------------------------------------------------
# secrets in errors


async def test_pop3_server_echoing_the_password_does_not_put_it_in_the_error(
    configs: ConfigWriter, leaf: trustme.LeafCert, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    reply = b"-ERR [AUTH] PASS " + SECRET.encode() + b" not accepted\r\n"
    async with serve(pop3(server_ctx(leaf), pass_reply=reply)) as (port, _):
        outcome = await poll(configs, account(configs, "pop3", port))
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert_no_secret_shown(outcome, caplog)


async def test_imap_server_echoing_the_token_does_not_put_it_in_the_error(
    configs: ConfigWriter, leaf: trustme.LeafCert, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    reply = b"TAG NO [AUTHENTICATIONFAILED] bad credentials " + TOKEN.encode() + b"\r\n"
    async with serve(imap(server_ctx(leaf), login_reply=reply)) as (port, _):
        outcome = await poll(configs, account(configs, "imap", port))
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert_no_secret_shown(outcome, caplog)


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
async def test_certificate_errors_carry_no_secret(
    configs: ConfigWriter,
    ca: trustme.CA,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = ca.issue_cert("elsewhere.test")
    script = (pop3 if protocol == "pop3" else imap)(server_ctx(wrong))
    async with serve(script) as (port, peer):
        outcome = await poll(configs, account(configs, protocol, port))
    assert "not for localhost" in str(outcome.error), outcome.line()
    assert "victim" in outcome.line() and "localhost" in outcome.line()
    assert_no_secret_shown(outcome, caplog)
    assert not peer.got_credentials


# ---------------------------------------------------------------------------------------------
# delivery TLS


MESSAGE = b"From: a@example.org\r\nTo: alice@localhost\r\nSubject: t\r\n\r\nhello\r\n"


def pop3_mailbox() -> Script:
    """A plaintext POP3 server with one message, for delivery tests."""

    async def script(c: Conn) -> None:
        await c.send(b"+OK hello\r\n")
        while line := await c.line():
            cmd = line.split()[0].upper() if line.split() else b""
            if cmd == b"CAPA":
                await c.send(b"+OK\r\nUSER\r\nUIDL\r\n.\r\n")
            elif cmd in (b"USER", b"PASS", b"DELE", b"NOOP"):
                await c.send(b"+OK\r\n")
            elif cmd == b"UIDL":
                await c.send(b"+OK\r\n1 u1\r\n.\r\n")
            elif cmd == b"LIST":
                await c.send(b"+OK\r\n1 %d\r\n.\r\n" % len(MESSAGE))
            elif cmd == b"RETR":
                await c.send(b"+OK\r\n" + MESSAGE + b".\r\n")
            elif cmd == b"QUIT":
                await c.send(b"+OK bye\r\n")
                return
            else:
                await c.send(b"-ERR ?\r\n")

    return script


def delivery_account(
    configs: ConfigWriter, pop_port: int, smtp_port: int, tls: dict[str, Any]
) -> dict[str, Any]:
    return account(
        configs,
        "pop3",
        pop_port,
        host="127.0.0.1",
        tls={"mode": "none", "allow_plaintext": True},
        keep=True,
        deliver={
            "smtp": f"127.0.0.1:{smtp_port}",
            "to": ["alice@localhost"],
            "timeout": 3,
            "tls": tls,
        },
    )


async def test_delivery_to_an_mta_with_an_untrusted_certificate_is_refused(
    configs: ConfigWriter,
) -> None:
    evil = trustme.CA().issue_cert("127.0.0.1")
    async with (
        serve(pop3_mailbox()) as (pop_port, _),
        smtp_sink(tls_context=server_ctx(evil), require_starttls=True) as sink,
    ):
        outcome = await poll(
            configs,
            delivery_account(
                configs,
                pop_port,
                sink.port,
                {"mode": "starttls", "ca_file": str(configs.ca_file)},
            ),
        )
    assert outcome.error is not None, outcome.line()
    assert sink.accepted == []


@pytest.mark.parametrize("verify", [False, True])
async def test_delivery_pins_are_enforced(
    configs: ConfigWriter, ca: trustme.CA, verify: bool
) -> None:
    cert = ca.issue_cert("127.0.0.1")
    wrong = spki_pin(der_of(trustme.CA().issue_cert("127.0.0.1")))
    async with (
        serve(pop3_mailbox()) as (pop_port, _),
        smtp_sink(tls_context=server_ctx(cert), require_starttls=True) as sink,
    ):
        outcome = await poll(
            configs,
            delivery_account(
                configs,
                pop_port,
                sink.port,
                {
                    "mode": "starttls",
                    "ca_file": str(configs.ca_file),
                    "verify": verify,
                    "fingerprints": [wrong],
                },
            ),
        )
    assert sink.accepted == [], "a message went to an MTA whose certificate fails the pin"
    assert outcome.error is not None


async def test_delivery_verify_false_warns_at_connect(
    configs: ConfigWriter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    anyone = trustme.CA().issue_cert("127.0.0.1")
    async with (
        serve(pop3_mailbox()) as (pop_port, _),
        smtp_sink(tls_context=server_ctx(anyone), require_starttls=True) as sink,
    ):
        outcome = await poll(
            configs,
            delivery_account(configs, pop_port, sink.port, {"mode": "starttls", "verify": False}),
        )
    assert outcome.ok and len(sink.accepted) == 1, outcome.line()
    at_connect = [r for r in caplog.records if "verif" in r.getMessage().lower()]
    assert at_connect, [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------------------------------------
# fetchd probe against hostile servers


def probe_settings(
    configs: ConfigWriter, mode: Literal["implicit", "starttls"] = "implicit"
) -> TLSSettings:
    return TLSSettings(mode=mode, ca_file=str(configs.ca_file), system_ca=False)


async def test_probe_endless_untagged_lines_before_starttls_ok_is_bounded(
    configs: ConfigWriter,
) -> None:
    async def chatter(c: Conn) -> None:
        await c.send(b"* OK ready\r\n")
        await c.line()
        while True:
            await c.send(b"* chatter\r\n" * 100)
            await asyncio.sleep(0.01)

    async with serve(chatter) as (port, _):
        with pytest.raises(FetchdError):
            await asyncio.wait_for(
                probe(
                    "127.0.0.1",
                    port,
                    starttls="imap",
                    settings=probe_settings(configs, "starttls"),
                    deadline=1.5,
                ),
                10,
            )


async def test_probe_endless_greeting_gives_a_clear_error(configs: ConfigWriter) -> None:
    async def endless(c: Conn) -> None:
        while True:
            await c.send(b"+OK " + b"x" * 65536)
            await asyncio.sleep(0.01)

    async with serve(endless) as (port, _):
        with pytest.raises(FetchdError):
            await asyncio.wait_for(
                probe(
                    "127.0.0.1",
                    port,
                    starttls="pop3",
                    settings=probe_settings(configs, "starttls"),
                    deadline=3,
                ),
                10,
            )


async def test_probe_never_sends_credentials_to_a_bad_certificate(
    configs: ConfigWriter, ca: trustme.CA
) -> None:
    wrong = ca.issue_cert("elsewhere.test")
    async with serve(pop3(server_ctx(wrong))) as (port, peer):
        result = await asyncio.wait_for(
            probe(
                "localhost",
                port,
                starttls="pop3",
                settings=probe_settings(configs, "starttls"),
                deadline=3,
            ),
            10,
        )
    assert not result.ok and "not for localhost" in result.verdict
    assert not peer.got_credentials and b"USER" not in peer.received


async def test_probe_verdict_and_fingerprints_describe_the_same_certificate(
    configs: ConfigWriter, ca: trustme.CA
) -> None:
    good = ca.issue_cert("localhost")
    evil = trustme.CA().issue_cert("localhost")
    served: list[bytes] = []

    async def alternate(c: Conn) -> None:
        cert = evil if c.peer.connections % 2 == 1 else good
        served.append(der_of(cert))
        await c.tls(server_ctx(cert))
        await c.send(b"+OK hello\r\n")
        await asyncio.sleep(1)

    async with serve(alternate) as (port, _):
        result = await asyncio.wait_for(
            probe("localhost", port, starttls=None, settings=probe_settings(configs), deadline=3),
            10,
        )
    # Whatever the verdict, it must be about the certificate whose fingerprints are shown.
    shown = result.chain[0]
    assert not (result.ok and shown == der_of(evil)), "OK shown for an unverified certificate"


# ---------------------------------------------------------------------------------------------
# error wording


@pytest.mark.parametrize("case", ["plaintext server on the TLS port", "injection mid-handshake"])
async def test_non_tls_bytes_are_not_called_a_version_mismatch(
    configs: ConfigWriter, leaf: trustme.LeafCert, case: str
) -> None:
    if case == "plaintext server on the TLS port":
        script = pop3(None, caps=b"+OK\r\nUSER\r\n.\r\n")
        tls = {"mode": "implicit"}
    else:

        async def inject(c: Conn) -> None:
            await asyncio.sleep(0.05)
            await c.send(b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n")

        script = pop3(server_ctx(leaf), after_stls=inject)
        tls = {}
    async with serve(script) as (port, peer):
        outcome = await poll(configs, account(configs, "pop3", port, tls=tls))
    assert not peer.got_credentials
    assert "no TLS version in common" not in str(outcome.error), outcome.line()
    assert not isinstance(outcome.error, PermanentError), outcome.line()


async def test_revoked_intermediate_is_named_as_such(
    configs: ConfigWriter, ca: trustme.CA, tmp_path: Path
) -> None:
    inter = ca.create_child_ca()
    leaf = inter.issue_cert("localhost")
    crl = tmp_path / "chain.crl"
    crl.write_bytes(make_crl(ca, [inter]) + make_crl(inter, []))
    async with serve(imap(server_ctx(leaf), implicit=True)) as (port, _):
        outcome = await poll(
            configs,
            account(
                configs,
                "imap",
                port,
                tls={"mode": "implicit", "crl_file": str(crl), "crl_check": "chain"},
            ),
        )
    assert "revoked" in str(outcome.error), outcome.line()
    assert "certificate for localhost has been revoked" not in str(outcome.error), outcome.line()
