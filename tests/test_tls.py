"""The TLS matrix: certificates good and bad, pins, versions, client certificates, over implicit
TLS and STARTTLS, POP3 and IMAP. A small scripted server presents each certificate and records
what the client sent: a refused certificate means no credential ever reaches it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from fetchd.errors import PermanentError
from tests.conftest import ConfigWriter
from tests.test_interop import poll_once

SECRET = "tls-test-secret"
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)
MODES = [("pop3", "implicit"), ("pop3", "starttls"), ("imap", "implicit"), ("imap", "starttls")]


@dataclass
class Recorder:
    received: bytearray = field(default_factory=bytearray)
    handshakes: int = 0

    @property
    def got_credentials(self) -> bool:
        words = (SECRET.encode(), b"USER", b"PASS", b"LOGIN", b"AUTHENTICATE", b"AUTH ")
        return any(w in self.received for w in words)


def server_context(leaf: trustme.LeafCert, *, chain: bool = True, **options: Any) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if chain:
        leaf.configure_cert(ctx)
    else:  # the leaf alone, without its intermediates
        key = leaf.private_key_pem.bytes()
        with _tmp(leaf.cert_chain_pems[0].bytes() + key) as path:
            ctx.load_cert_chain(path)
    if "client_ca" in options:
        ctx.verify_mode = ssl.CERT_REQUIRED
        options["client_ca"].configure_trust(ctx)
    if "max_version" in options:
        ctx.maximum_version = options["max_version"]
    return ctx


class _tmp:
    """A temporary file holding `data`, for APIs that only take paths."""

    def __init__(self, data: bytes) -> None:
        import tempfile

        self.file = tempfile.NamedTemporaryFile(suffix=".pem")  # noqa: SIM115
        self.file.write(data)
        self.file.flush()

    def __enter__(self) -> str:
        return self.file.name

    def __exit__(self, *exc: object) -> None:
        self.file.close()


@asynccontextmanager
async def tls_server(
    protocol: str, mode: str, ctx: ssl.SSLContext
) -> AsyncIterator[tuple[int, Recorder]]:
    """A POP3 or IMAP server that secures the session and refuses every login."""
    rec = Recorder()
    imap = protocol == "imap"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"* OK ready\r\n" if imap else b"+OK ready\r\n")
            while line := await reader.readline():
                rec.received.extend(line)
                words = line.split()
                tag = words[0] if imap and words else b""
                cmd = (
                    (words[1] if imap else words[0]).upper()
                    if len(words) > (1 if imap else 0)
                    else b""
                )
                if cmd in (b"CAPA",):
                    writer.write(b"+OK\r\nUSER\r\nSTLS\r\n.\r\n")
                elif cmd == b"CAPABILITY":
                    writer.write(
                        b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR\r\n%s OK done\r\n"
                        % tag
                    )
                elif cmd in (b"STLS", b"STARTTLS"):
                    writer.write(b"%s OK go\r\n" % tag if imap else b"+OK go\r\n")
                    await writer.drain()
                    await writer.start_tls(ctx)
                    rec.handshakes += 1
                elif cmd == b"USER":
                    writer.write(b"+OK\r\n")
                elif cmd in (b"PASS", b"AUTH"):
                    writer.write(b"-ERR [AUTH] test server refuses everyone\r\n")
                elif cmd in (b"LOGIN", b"AUTHENTICATE"):
                    writer.write(
                        b"%s NO [AUTHENTICATIONFAILED] test server refuses everyone\r\n" % tag
                    )
                elif cmd in (b"QUIT", b"LOGOUT"):
                    writer.write(b"* BYE\r\n%s OK bye\r\n" % tag if imap else b"+OK bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"%s BAD ?\r\n" % tag if imap else b"-ERR ?\r\n")
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(
        serve, "127.0.0.1", 0, ssl=ctx if mode == "implicit" else None
    )
    try:
        yield server.sockets[0].getsockname()[1], rec
    finally:
        server.close()


async def poll(
    configs: ConfigWriter, protocol: str, mode: str, port: int, host: str = "localhost", **tls: Any
) -> Any:
    config = configs.write(
        [
            {
                "name": "tls-test",
                "protocol": protocol,
                "host": host,
                "port": port,
                "user": "alice",
                "password": SECRET,
                "timeout": 5,
                "tls": {"mode": mode, "ca_file": str(configs.ca_file), **tls},
                "deliver": {"smtp": "127.0.0.1:9", "to": ["alice@localhost"]},
            }
        ]
    )
    (outcome,) = await asyncio.wait_for(poll_once(config), 30)
    return outcome


def assert_tls_passed(outcome: Any, rec: Recorder) -> None:
    """TLS was accepted: fetchd went on to log in, which the test server refuses."""
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert "login failed" in str(outcome.error), outcome.line()
    assert rec.got_credentials


def assert_refused(outcome: Any, rec: Recorder, *words: str) -> None:
    assert isinstance(outcome.error, PermanentError), outcome.line()
    for w in words:
        assert w in str(outcome.error), outcome.line()
    assert "tls-test" in str(outcome.error) or "tls-test" in outcome.line()
    assert not rec.got_credentials, "a credential reached a server whose certificate was refused"


def der_of(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


@pytest.fixture(scope="module")
def leaf(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("localhost", "127.0.0.1")


@pytest.mark.parametrize(("protocol", "mode"), MODES)
async def test_valid_certificate_is_accepted(
    configs: ConfigWriter, leaf: trustme.LeafCert, protocol: str, mode: str
) -> None:
    async with tls_server(protocol, mode, server_context(leaf)) as (port, rec):
        outcome = await poll(configs, protocol, mode, port)
    assert_tls_passed(outcome, rec)


CASES = {
    "expired": (
        lambda ca: ca.issue_cert("localhost", not_before=NOW - 30 * DAY, not_after=NOW - DAY),
        {},
        ["expired on", (NOW - DAY).strftime("%Y-%m-%d")],
    ),
    "not yet valid": (
        lambda ca: ca.issue_cert("localhost", not_before=NOW + DAY, not_after=NOW + 30 * DAY),
        {},
        ["not valid before", "clock"],
    ),
    "wrong host": (
        lambda ca: ca.issue_cert("mail.example.net"),
        {},
        ["certificate is for mail.example.net, not for localhost"],
    ),
    "unknown CA": (
        lambda ca: trustme.CA(organization_name="Evil CA").issue_cert("localhost"),
        {},
        ["unknown CA", "Evil CA"],
    ),
    "missing intermediate": (
        lambda ca: ca.create_child_ca().issue_cert("localhost"),
        {"chain": False},
        ["unknown CA"],
    ),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("protocol", "mode"), MODES)
async def test_bad_certificates_are_refused_before_any_credential(
    configs: ConfigWriter, ca: trustme.CA, protocol: str, mode: str, case: str
) -> None:
    make, options, words = CASES[case]
    async with tls_server(protocol, mode, server_context(make(ca), **options)) as (port, rec):
        outcome = await poll(configs, protocol, mode, port)
    assert_refused(outcome, rec, *words)


@pytest.mark.parametrize(("protocol", "mode"), MODES)
async def test_self_signed_certificate_is_refused(
    configs: ConfigWriter, protocol: str, mode: str, tmp_path: Path
) -> None:
    own = trustme.CA(organization_name="Self Signed Server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _tmp(own.cert_pem.bytes() + own.private_key_pem.bytes()) as path:
        ctx.load_cert_chain(path)
    async with tls_server(protocol, mode, ctx) as (port, rec):
        outcome = await poll(configs, protocol, mode, port)
    assert_refused(outcome, rec, "self-signed")


@pytest.mark.parametrize(("protocol", "mode"), [("pop3", "implicit"), ("imap", "starttls")])
async def test_present_intermediate_is_accepted(
    configs: ConfigWriter, ca: trustme.CA, protocol: str, mode: str
) -> None:
    leaf = ca.create_child_ca().issue_cert("localhost")
    async with tls_server(protocol, mode, server_context(leaf)) as (port, rec):
        outcome = await poll(configs, protocol, mode, port)
    assert_tls_passed(outcome, rec)


@pytest.mark.parametrize(("protocol", "mode"), [("imap", "implicit"), ("pop3", "starttls")])
async def test_ip_address_is_checked_against_ip_names(
    configs: ConfigWriter, ca: trustme.CA, protocol: str, mode: str
) -> None:
    name_only = ca.issue_cert("localhost")
    async with tls_server(protocol, mode, server_context(name_only)) as (port, rec):
        outcome = await poll(configs, protocol, mode, port, host="127.0.0.1")
    assert_refused(outcome, rec, "not for 127.0.0.1")
    with_ip = ca.issue_cert("127.0.0.1")
    async with tls_server(protocol, mode, server_context(with_ip)) as (port, rec):
        outcome = await poll(configs, protocol, mode, port, host="127.0.0.1")
    assert_tls_passed(outcome, rec)


def crl_revoking(ca: trustme.CA, revoked: trustme.LeafCert, path: Path) -> Path:
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject
    serial = x509.load_pem_x509_certificate(revoked.cert_chain_pems[0].bytes()).serial_number
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(NOW - DAY)
        .next_update(NOW + DAY)
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(NOW - DAY)
            .build()
        )
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize(("protocol", "mode"), MODES)
async def test_revoked_certificate_is_refused_with_a_crl(
    configs: ConfigWriter,
    ca: trustme.CA,
    leaf: trustme.LeafCert,
    protocol: str,
    mode: str,
    tmp_path: Path,
) -> None:
    revoked = ca.issue_cert("localhost")
    crl = crl_revoking(ca, revoked, tmp_path / "ca.crl")
    async with tls_server(protocol, mode, server_context(revoked)) as (port, rec):
        outcome = await poll(configs, protocol, mode, port, crl_file=str(crl))
    assert_refused(outcome, rec, "revoked")
    async with tls_server(protocol, mode, server_context(leaf)) as (port, rec):
        outcome = await poll(configs, protocol, mode, port, crl_file=str(crl))
    assert_tls_passed(outcome, rec)


async def test_hashed_ca_directory_is_a_trust_source(
    configs: ConfigWriter, ca: trustme.CA, leaf: trustme.LeafCert, tmp_path: Path
) -> None:
    directory = tmp_path / "certs"
    directory.mkdir()
    ca.cert_pem.write_to_path(str(directory / "test-ca.pem"))
    proc = await asyncio.create_subprocess_exec("openssl", "rehash", str(directory))
    assert await proc.wait() == 0
    async with tls_server("imap", "implicit", server_context(leaf)) as (port, rec):
        # No CA file: the directory is the only trust source.
        outcome = await poll(
            configs, "imap", "implicit", port, ca_file=None, ca_path=str(directory)
        )
    assert_tls_passed(outcome, rec)


@pytest.mark.parametrize(("protocol", "mode"), MODES)
async def test_client_certificate_required_and_given(
    configs: ConfigWriter,
    ca: trustme.CA,
    leaf: trustme.LeafCert,
    protocol: str,
    mode: str,
    tmp_path: Path,
) -> None:
    client = ca.issue_cert("fetchd@example.org")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(b"".join(p.bytes() for p in client.cert_chain_pems))
    key.write_bytes(client.private_key_pem.bytes())
    ctx = server_context(leaf, client_ca=ca)
    async with tls_server(protocol, mode, ctx) as (port, rec):
        outcome = await poll(
            configs, protocol, mode, port, client_cert=str(cert), client_key=str(key)
        )
    assert_tls_passed(outcome, rec)
    async with tls_server(protocol, mode, ctx) as (port, rec):
        outcome = await poll(configs, protocol, mode, port)
    assert outcome.error is not None and not rec.got_credentials


def pin_formats(der: bytes) -> dict[str, str]:
    md5 = hashlib.md5(der, usedforsecurity=False).hexdigest()
    sha256 = hashlib.sha256(der).hexdigest()
    spki = (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    colons = lambda h: ":".join(h[i : i + 2] for i in range(0, len(h), 2))  # noqa: E731
    return {
        "fetchmail md5 upper": colons(md5).upper(),
        "fetchmail md5 lower": colons(md5).lower(),
        "md5 without colons": md5,
        "{SHA256} prefix": "{SHA256}" + colons(sha256).upper(),
        "sha256: lower no colons": "sha256:" + sha256,
        "sha256: with colons": "sha256:" + colons(sha256),
        "spki pin": "pin-sha256:" + base64.b64encode(hashlib.sha256(spki).digest()).decode(),
    }


PIN_FORMATS = [
    "fetchmail md5 upper",
    "fetchmail md5 lower",
    "md5 without colons",
    "{SHA256} prefix",
    "sha256: lower no colons",
    "sha256: with colons",
    "spki pin",
]


@pytest.mark.parametrize("fmt", PIN_FORMATS)
@pytest.mark.parametrize(("protocol", "mode"), [("pop3", "starttls"), ("imap", "implicit")])
async def test_every_pin_format_matches_and_a_wrong_pin_refuses(
    configs: ConfigWriter, leaf: trustme.LeafCert, protocol: str, mode: str, fmt: str
) -> None:
    right = pin_formats(der_of(leaf))[fmt]
    async with tls_server(protocol, mode, server_context(leaf)) as (port, rec):
        outcome = await poll(configs, protocol, mode, port, fingerprints=[right])
    assert_tls_passed(outcome, rec)

    other = pin_formats(der_of(trustme.CA().issue_cert("localhost")))[fmt]
    async with tls_server(protocol, mode, server_context(leaf)) as (port, rec):
        outcome = await poll(configs, protocol, mode, port, fingerprints=[other])
    sha256 = hashlib.sha256(der_of(leaf)).hexdigest().upper()
    assert_refused(outcome, rec, "fingerprint mismatch", sha256[:2] + ":" + sha256[2:4])


@pytest.mark.parametrize(("protocol", "mode"), [("pop3", "implicit"), ("imap", "starttls")])
async def test_pin_alone_decides_when_verification_is_off(
    configs: ConfigWriter, protocol: str, mode: str
) -> None:
    stranger = trustme.CA().issue_cert("somewhere.else")
    pin = pin_formats(der_of(stranger))["sha256: with colons"]
    async with tls_server(protocol, mode, server_context(stranger)) as (port, rec):
        outcome = await poll(configs, protocol, mode, port, verify=False, fingerprints=[pin])
    assert_tls_passed(outcome, rec)
    async with tls_server(protocol, mode, server_context(stranger)) as (port, rec):
        outcome = await poll(configs, protocol, mode, port, verify=True, fingerprints=[pin])
    assert_refused(outcome, rec, "unknown CA")


@pytest.mark.parametrize(("protocol", "mode"), MODES)
async def test_version_floor_not_met(
    configs: ConfigWriter, leaf: trustme.LeafCert, protocol: str, mode: str
) -> None:
    ctx = server_context(leaf, max_version=ssl.TLSVersion.TLSv1_2)
    async with tls_server(protocol, mode, ctx) as (port, rec):
        outcome = await poll(configs, protocol, mode, port, min_version="1.3")
    # asyncio's TLS server closes without an alert, so the client cannot tell the reason.
    assert outcome.error is not None and "TLS versions" in str(outcome.error), outcome.line()
    assert not rec.got_credentials
    async with tls_server(protocol, mode, ctx) as (port, rec):
        outcome = await poll(configs, protocol, mode, port, sslproto="tls1.2")
    assert_tls_passed(outcome, rec)


async def test_encrypted_client_key_with_a_passphrase_file(
    configs: ConfigWriter, ca: trustme.CA, leaf: trustme.LeafCert, tmp_path: Path
) -> None:
    client = ca.issue_cert("fetchd@example.org")
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"key passphrase"),
    )
    cert, key_file, phrase = tmp_path / "c.pem", tmp_path / "c.key", tmp_path / "c.pass"
    cert.write_bytes(b"".join(p.bytes() for p in client.cert_chain_pems))
    key_file.write_bytes(encrypted)
    phrase.write_text("key passphrase\n")
    phrase.chmod(0o600)
    ctx = server_context(leaf, client_ca=ca)
    async with tls_server("imap", "implicit", ctx) as (port, rec):
        outcome = await poll(
            configs,
            "imap",
            "implicit",
            port,
            client_cert=str(cert),
            client_key=str(key_file),
            client_key_password_file=str(phrase),
        )
    assert_tls_passed(outcome, rec)
    phrase.write_text("wrong\n")
    outcome = await poll(
        configs,
        "imap",
        "implicit",
        port,
        client_cert=str(cert),
        client_key=str(key_file),
        client_key_password_file=str(phrase),
    )
    assert "is the key passphrase right" in str(outcome.error), outcome.line()


async def test_tls_connections_keep_a_small_receive_buffer(
    leaf: trustme.LeafCert, ca: trustme.CA
) -> None:
    """asyncio's default is 256 KiB per connection, zero-filled at once: a daemon holding 1,000
    IDLE connections would spend 250 MiB on it."""
    import fetchd.tls

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context(leaf))
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context()
    ca.configure_trust(client)
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"
        )
        assert await reader.readline() == b"hello\r\n"
        ssl_protocol = writer.transport._ssl_protocol  # type: ignore[attr-defined]
        assert len(ssl_protocol._ssl_buffer) <= fetchd.tls._TLS_READ_BUFFER == 32 * 1024
        writer.close()
        await writer.wait_closed()
