"""OAuth2 built in: the access token refreshed by fetchd, SASL XOAUTH2/OAUTHBEARER against
scripted IMAP and POP3 servers that accept only tokens the fake provider currently honours, and
``fetchd oauth2 login`` (device code and browser with PKCE) against the same provider.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import stat
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from fetchd import cli, oauth2
from fetchd.config import OAuth2Settings, load
from fetchd.errors import ConfigError, PermanentError, TemporaryError
from fetchd.poller import Poller
from fetchd.state import State
from fetchd.supervisor import Outcome
from tests.conftest import ConfigWriter
from tests.support.oauth_server import CLIENT_ID, TokenEndpoint, token_endpoint
from tests.support.sink import Sink, smtp_sink
from tests.test_interop import poll_once

USER = "alice@example.org"
SCOPE = "https://mail.example/"
MESSAGE = b"From: bob@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
BOTH = b"AUTH=OAUTHBEARER AUTH=XOAUTH2"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def bearer(mechanism: str, initial: bytes) -> tuple[str, str]:
    """(user, token) of an XOAUTH2 or OAUTHBEARER initial response."""
    text = initial.decode()
    if mechanism == "OAUTHBEARER":
        gs2, _, rest = text.partition("\x01")
        assert gs2.startswith("n,a=") and gs2.endswith(","), gs2
        user = gs2[4:-1].replace("=2C", ",").replace("=3D", "=")
    else:
        first, _, rest = text.partition("\x01")
        assert first.startswith("user="), first
        user = first[5:]
    fields = dict(f.split("=", 1) for f in rest.split("\x01") if f)
    assert rest.endswith("\x01\x01") and fields["auth"].startswith("Bearer "), rest
    return user, fields["auth"][7:]


@dataclass
class Login:
    mechanism: str
    token: str
    ok: bool
    dummy: bytes | None = None  # the client's answer to the error challenge


@dataclass
class MailServer:
    """Scripted IMAP or POP3 that accepts only tokens the endpoint issued and still honours,
    for ``scope``. A refused token gets RFC 7628's error challenge before the final NO."""

    endpoint: TokenEndpoint
    protocol: str
    mailbox: dict[int, bytes] = field(default_factory=dict)
    mechanisms: bytes = BOTH
    sasl_ir: bool = True
    scope: str = SCOPE
    logins: list[Login] = field(default_factory=list)
    auth_lines: list[bytes] = field(default_factory=list)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.protocol == "imap":
                await self.imap(reader, writer)
            else:
                await self.pop3(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def authenticate(
        self,
        mechanism: str,
        initial: bytes | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        prompt: bytes,
    ) -> bool:
        if initial is None:
            writer.write(prompt)
            initial = (await reader.readline()).strip()
        user, token = bearer(mechanism, base64.b64decode(initial))
        status = "401" if user != USER else self.endpoint.check(token, self.scope)
        login = Login(mechanism, token, status is None)
        self.logins.append(login)
        if status is not None:
            error = {"status": status, "schemes": "bearer", "scope": self.scope}
            writer.write(b"+ " + b64(json.dumps(error).encode()) + b"\r\n")
            login.dummy = (await reader.readline()).rstrip(b"\r\n")
        return status is None

    async def imap(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        caps = b"IMAP4rev1 UIDPLUS " + (b"SASL-IR " if self.sasl_ir else b"") + self.mechanisms
        writer.write(b"* OK fake IMAP ready\r\n")
        flagged: set[int] = set()
        while line := await reader.readline():
            tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
            words = rest.split(b" ")
            verb = words[0].upper()
            if verb == b"UID":
                verb, words = b"UID " + words[1].upper(), words[1:]
            if verb == b"CAPABILITY":
                writer.write(b"* CAPABILITY " + caps + b"\r\n" + tag + b" OK done\r\n")
            elif verb == b"AUTHENTICATE":
                self.auth_lines.append(line)
                mechanism = words[1].upper().decode()
                initial = words[2] if len(words) > 2 else None
                ok = await self.authenticate(mechanism, initial, reader, writer, b"+ \r\n")
                writer.write(
                    tag + b" OK authenticated\r\n"
                    if ok
                    else tag + b" NO [AUTHENTICATIONFAILED] Invalid credentials\r\n"
                )
            elif verb in (b"SELECT", b"EXAMINE"):
                last = max(self.mailbox, default=0)
                writer.write(
                    b"* %d EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT %d] ok\r\n"
                    % (len(self.mailbox), last + 1)
                    + tag
                    + b" OK [READ-WRITE] selected\r\n"
                )
            elif verb == b"UID SEARCH":
                uids = b" ".join(b"%d" % u for u in sorted(self.mailbox))
                writer.write(b"* SEARCH " + uids + b"\r\n" + tag + b" OK done\r\n")
            elif verb == b"UID FETCH":
                uid = int(words[1])
                body = self.mailbox.get(uid, b"")
                seq = sorted(self.mailbox).index(uid) + 1 if uid in self.mailbox else 0
                data = b"* %d FETCH (UID %d RFC822.SIZE %d BODY[] {%d}\r\n%s)\r\n" % (
                    seq,
                    uid,
                    len(body),
                    len(body),
                    body,
                )
                writer.write((data if body else b"") + tag + b" OK fetched\r\n")
            elif verb == b"UID STORE":
                for part in words[1].split(b","):
                    low, _, high = part.partition(b":")
                    flagged |= set(range(int(low), int(high or low) + 1))
                writer.write(tag + b" OK stored\r\n")
            elif verb == b"UID EXPUNGE":
                for uid in sorted(flagged & set(self.mailbox), reverse=True):
                    writer.write(b"* %d EXPUNGE\r\n" % (sorted(self.mailbox).index(uid) + 1))
                    del self.mailbox[uid]
                flagged.clear()
                writer.write(tag + b" OK expunged\r\n")
            elif verb == b"LOGOUT":
                writer.write(b"* BYE bye\r\n" + tag + b" OK bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(tag + b" BAD unknown command\r\n")
            await writer.drain()

    async def pop3(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK fake POP3 ready\r\n")
        session = sorted(self.mailbox)
        marked: set[int] = set()
        while line := await reader.readline():
            words = line.rstrip(b"\r\n").split(b" ")
            verb = words[0].upper()
            if verb == b"CAPA":
                sasl = self.mechanisms.replace(b"AUTH=", b"")
                writer.write(b"+OK\r\nUIDL\r\nSASL " + sasl + b"\r\n.\r\n")
            elif verb == b"AUTH":
                self.auth_lines.append(line)
                if len(line) > 255:  # RFC 5034: not allowed
                    writer.write(b"-ERR line too long\r\n")
                    continue
                mechanism = words[1].upper().decode()
                initial = words[2] if len(words) > 2 else None
                ok = await self.authenticate(mechanism, initial, reader, writer, b"+ \r\n")
                writer.write(b"+OK authenticated\r\n" if ok else b"-ERR [AUTH] invalid token\r\n")
            elif verb == b"UIDL":
                lines = b"".join(b"%d u%d\r\n" % (i + 1, uid) for i, uid in enumerate(session))
                writer.write(b"+OK\r\n" + lines + b".\r\n")
            elif verb == b"LIST":
                lines = b"".join(
                    b"%d %d\r\n" % (i + 1, len(self.mailbox[uid])) for i, uid in enumerate(session)
                )
                writer.write(b"+OK\r\n" + lines + b".\r\n")
            elif verb == b"RETR":
                writer.write(b"+OK\r\n" + self.mailbox[session[int(words[1]) - 1]] + b".\r\n")
            elif verb == b"DELE":
                marked.add(session[int(words[1]) - 1])
                writer.write(b"+OK\r\n")
            elif verb == b"QUIT":
                for uid in marked:
                    del self.mailbox[uid]
                writer.write(b"+OK bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"-ERR unknown command\r\n")
            await writer.drain()


@dataclass
class Setup:
    endpoint: TokenEndpoint
    server: MailServer
    sink: Sink
    config: Path
    refresh_file: Path

    def refreshes(self) -> int:
        return len(self.endpoint.grants("refresh_token"))


@pytest.fixture
def endpoint() -> Iterator[TokenEndpoint]:
    with token_endpoint() as e:
        yield e


@dataclass
class Clock:
    """fetchd's view of time for token lifetimes; moved forward by hand."""

    offset: float = 0.0

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    real = oauth2._now
    monkeypatch.setattr(oauth2, "_now", lambda: real() + c.offset)
    return c


def account_for(
    endpoint: TokenEndpoint,
    protocol: str,
    port: int,
    sink_port: int,
    refresh_file: Path,
    **extra: Any,
) -> dict[str, Any]:
    oauth: dict[str, Any] = {
        "token_url": endpoint.token_url,
        "device_authorization_url": endpoint.device_url,
        "authorization_url": endpoint.authorization_url,
        "client_id": CLIENT_ID,
        "scope": SCOPE,
        "refresh_token_file": str(refresh_file),
    }
    oauth.update(extra.pop("oauth2", {}))
    account: dict[str, Any] = {
        "name": "alice",
        "protocol": protocol,
        "host": "127.0.0.1",
        "port": port,
        "user": USER,
        "auth": "oauth2",
        "timeout": 3,
        "tls": {"mode": "none", "allow_plaintext": True},
        "oauth2": oauth,
        "deliver": {"smtp": f"127.0.0.1:{sink_port}", "to": ["alice@localhost"]},
    }
    account.update(extra)
    return account


@asynccontextmanager
async def mail_setup(
    configs: ConfigWriter,
    endpoint: TokenEndpoint,
    protocol: str = "imap",
    *,
    refresh_token: bool = True,
    **server_options: Any,
) -> AsyncIterator[Setup]:
    server = MailServer(endpoint, protocol, **server_options)
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    refresh_file = configs.directory / "alice.refresh-token"
    if refresh_token:
        refresh_file.write_text(endpoint.issue_refresh_token(SCOPE) + "\n")
        refresh_file.chmod(0o600)
    try:
        async with smtp_sink() as sink:
            account = account_for(endpoint, protocol, port, sink.port, refresh_file)
            yield Setup(endpoint, server, sink, configs.write([account]), refresh_file)
    finally:
        srv.close()
        await srv.wait_closed()


async def poll(setup: Setup) -> Outcome:
    (outcome,) = await asyncio.wait_for(poll_once(setup.config), 20)
    return outcome


def assert_no_token_in(texts: list[str], endpoint: TokenEndpoint) -> None:
    with endpoint.lock:
        tokens = list(endpoint.access_tokens) + list(endpoint.refresh_tokens)
        tokens += [f.get("refresh_token", "") for _, f in endpoint.requests]
    for text in texts:
        for token in tokens:
            assert not token or token not in text, text


# ---------------------------------------------------------------------------------------------
# Configuration


def write_yaml(tmp_path: Path, oauth: dict[str, Any], **account: Any) -> Path:
    doc = {
        "state_file": str(tmp_path / "state.sqlite3"),
        "accounts": [
            {
                "name": "work",
                "protocol": "imap",
                "host": "outlook.office365.com",
                "user": USER,
                "oauth2": oauth,
                "deliver": {"smtp": "localhost:25", "to": ["alice@localhost"]},
                **account,
            }
        ],
    }
    path = tmp_path / "fetchd.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return path


def test_microsoft_preset_with_tenant(tmp_path: Path) -> None:
    oauth = {
        "provider": "microsoft",
        "tenant": "contoso.onmicrosoft.com",
        "client_id": "00000000-1111-2222-3333-444444444444",
        "refresh_token_file": "tokens/work",  # relative to the configuration file
    }
    (tmp_path / "tokens").mkdir()
    (account,) = load(write_yaml(tmp_path, oauth)).accounts
    s = account.oauth2
    assert account.auth == "oauth2" and s is not None
    base = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0"
    assert s.token_url == base + "/token"
    assert s.device_authorization_url == base + "/devicecode"
    assert s.authorization_url == base + "/authorize"
    assert s.scope == (
        "https://outlook.office.com/IMAP.AccessAsUser.All "
        "https://outlook.office.com/POP.AccessAsUser.All offline_access"
    )
    assert s.client_secret is None and s.refresh_token_file == str(tmp_path / "tokens" / "work")


def test_google_preset_and_client_secret_stay_out_of_reprs(tmp_path: Path) -> None:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("GOCSPX-very-secret\n")
    secret_file.chmod(0o600)
    oauth = {
        "provider": "google",
        "client_id": "123.apps.googleusercontent.com",
        "client_secret_file": str(secret_file),
        "refresh_token_file": str(tmp_path / "gmail.token"),
    }
    config = load(write_yaml(tmp_path, oauth, auth="xoauth2", host="imap.gmail.com"))
    (account,) = config.accounts
    s = account.oauth2
    assert s is not None and account.auth == "xoauth2"
    assert s.token_url == "https://oauth2.googleapis.com/token"
    assert s.device_authorization_url is None  # no device sign-in for mail scopes
    assert s.scope == "https://mail.google.com/"
    assert ("access_type", "offline") in s.authorization_params
    assert s.client_secret is not None and s.client_secret.reveal() == "GOCSPX-very-secret"
    assert "very-secret" not in repr(account) and "very-secret" not in repr(config)
    assert not config.warnings


def test_tenant_reaches_the_token_url_and_defaults_to_common(tmp_path: Path) -> None:
    oauth = {"provider": "microsoft", "client_id": "x", "refresh_token_file": "t"}
    (account,) = load(write_yaml(tmp_path, oauth)).accounts
    assert account.oauth2 is not None
    assert "/common/oauth2/v2.0/token" in account.oauth2.token_url


def test_explicit_scope_as_a_list_and_secret_from_the_environment(tmp_path: Path) -> None:
    oauth = {
        "token_url": "https://login.example.net/token",
        "client_id": "x",
        "client_secret_env": "CLIENT_SECRET",
        "scope": ["imap", "offline_access"],
        "refresh_token_file": "t",
    }
    (account,) = load(write_yaml(tmp_path, oauth), environ={"CLIENT_SECRET": "s3"}).accounts
    assert account.oauth2 is not None and account.oauth2.scope == "imap offline_access"
    assert account.oauth2.client_secret is not None
    assert account.oauth2.client_secret.reveal() == "s3"


@pytest.mark.parametrize(
    ("oauth", "account", "expected"),
    [
        (
            {"token_url": "http://login.example.net/token", "client_id": "x"},
            {},
            "token_url: must use https://",
        ),
        (
            {"provider": "microsoft", "authorization_url": "http://10.0.0.1/a", "client_id": "x"},
            {},
            "authorization_url: must use https://",
        ),
        ({"provider": "microsoft"}, {}, "needs client_id"),
        ({"client_id": "x"}, {}, "needs provider: microsoft or google, or token_url"),
        ({"provider": "yahoo", "client_id": "x"}, {}, "must be one of microsoft, google"),
        ({"provider": "google", "tenant": "t", "client_id": "x"}, {}, "tenant: applies with"),
        ({"provider": "microsoft", "client_id": "x"}, {"auth": "plain"}, "oauth2: applies with"),
        (
            {
                "provider": "microsoft",
                "client_id": "x",
                "token_file": "/t",
                "refresh_token_file": "t",
            },
            {},
            "give exactly one of refresh_token_file, token_file, token_command",
        ),
        (
            {"provider": "microsoft", "client_id": "x", "refresh_token_file": "/nowhere/t"},
            {},
            "no such directory: /nowhere",
        ),
        ({"token_file": "t", "client_id": "x"}, {}, "client_id: applies with refresh_token_file"),
        (
            {"provider": "microsoft", "client_id": "x", "client_secret_env": "NOPE"},
            {},
            "environment variable NOPE is not set",
        ),
    ],
)
def test_bad_oauth2_settings_are_refused(
    tmp_path: Path, oauth: dict[str, Any], account: dict[str, Any], expected: str
) -> None:
    if "token_file" not in oauth:
        oauth.setdefault("refresh_token_file", "t")
    with pytest.raises(ConfigError, match=r"oauth2|auth") as caught:
        load(write_yaml(tmp_path, oauth, **account), environ={})
    assert expected in str(caught.value)
    assert "fetchd.yaml:" in str(caught.value)


@pytest.mark.parametrize("which", ["client_secret_file", "refresh_token_file"])
def test_files_everyone_can_read_are_refused(tmp_path: Path, which: str) -> None:
    shared = tmp_path / "shared"
    shared.write_text("value\n")
    shared.chmod(0o644)
    oauth = {"provider": "microsoft", "client_id": "x", "refresh_token_file": "t"}
    oauth[which] = str(shared)
    with pytest.raises(ConfigError, match=f"{which}: .*readable or writable by everyone"):
        load(write_yaml(tmp_path, oauth))


def test_keys_of_a_token_helper_still_work(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("at\n")
    (account,) = load(write_yaml(tmp_path, {"token_file": "token"})).accounts
    assert account.auth == "oauth2" and account.oauth2 is None
    assert account.oauth2_token_file == str(tmp_path / "token")


# ---------------------------------------------------------------------------------------------
# Logging in with a token fetchd refreshes


@pytest.mark.parametrize(
    ("protocol", "mechanisms", "sasl_ir", "expected"),
    [
        ("imap", BOTH, True, "OAUTHBEARER"),
        ("imap", b"AUTH=XOAUTH2", True, "XOAUTH2"),
        ("imap", BOTH, False, "OAUTHBEARER"),
        ("pop3", BOTH, True, "OAUTHBEARER"),
        ("pop3", b"AUTH=XOAUTH2", True, "XOAUTH2"),
    ],
)
async def test_first_poll_gets_a_token_and_delivers(
    configs: ConfigWriter,
    endpoint: TokenEndpoint,
    protocol: str,
    mechanisms: bytes,
    sasl_ir: bool,
    expected: str,
) -> None:
    async with mail_setup(
        configs,
        endpoint,
        protocol,
        mailbox={1: MESSAGE},
        mechanisms=mechanisms,
        sasl_ir=sasl_ir,
    ) as setup:
        outcome = await poll(setup)
    assert outcome.ok, outcome.line()
    assert [(x.mechanism, x.ok) for x in setup.server.logins] == [(expected, True)]
    assert setup.refreshes() == 1
    assert len(setup.sink.accepted) == 1 and setup.sink.accepted[0].data.endswith(MESSAGE)
    assert setup.server.mailbox == {}
    if protocol == "pop3":  # tokens are long: sent after the server's empty challenge
        assert all(len(line) <= 255 for line in setup.server.auth_lines)


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_server_without_token_mechanisms_is_named(
    configs: ConfigWriter, endpoint: TokenEndpoint, protocol: str
) -> None:
    async with mail_setup(configs, endpoint, protocol, mechanisms=b"AUTH=PLAIN") as setup:
        outcome = await poll(setup)
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert "offers neither" in str(outcome.error) and "PLAIN" in str(outcome.error)
    assert setup.server.logins == []


def test_oauthbearer_escapes_the_user_name() -> None:
    from fetchd.sasl import oauthbearer

    mechanism = oauthbearer("a,b=c@example.org", "tok")
    assert mechanism.initial == b"n,a=a=2Cb=3Dc@example.org,\x01auth=Bearer tok\x01\x01"


async def test_token_is_reused_then_refreshed_before_it_expires(
    configs: ConfigWriter, endpoint: TokenEndpoint, clock: Clock
) -> None:
    async with mail_setup(configs, endpoint) as setup:
        assert (await poll(setup)).ok
        clock.advance(3000)  # 600 s left: still good
        assert (await poll(setup)).ok
        assert setup.refreshes() == 1
        clock.advance(400)  # 200 s left: less than the 5 minutes wanted
        endpoint.expire_access_tokens()  # the old token would fail now
        outcome = await poll(setup)
    assert outcome.ok, outcome.line()
    assert setup.refreshes() == 2
    first, second, third = setup.server.logins
    assert first.token == second.token != third.token
    assert all(x.ok for x in setup.server.logins)  # no failed login: refreshed in advance


async def test_short_lived_tokens_are_refreshed_at_half_their_life(
    configs: ConfigWriter, clock: Clock
) -> None:
    with token_endpoint(lifetime=60) as endpoint:
        async with mail_setup(configs, endpoint) as setup:
            assert (await poll(setup)).ok
            assert (await poll(setup)).ok
            clock.advance(31)
            assert (await poll(setup)).ok
    assert setup.refreshes() == 2


async def test_rotated_refresh_token_is_written_back(configs: ConfigWriter, clock: Clock) -> None:
    with token_endpoint(rotate=True) as endpoint:
        async with mail_setup(configs, endpoint) as setup:
            original = setup.refresh_file.read_text().strip()
            assert (await poll(setup)).ok
            rotated = setup.refresh_file.read_text().strip()
            assert rotated != original and rotated in endpoint.refresh_tokens
            assert original not in endpoint.refresh_tokens  # the old one is dead now
            assert stat.S_IMODE(setup.refresh_file.stat().st_mode) == 0o600
            assert [p.name for p in setup.refresh_file.parent.glob(".fetchd-oauth2-*")] == []
            clock.advance(3600)
            outcome = await poll(setup)
    assert outcome.ok, outcome.line()
    first, second = endpoint.grants("refresh_token")
    assert first["refresh_token"] == original and second["refresh_token"] == rotated
    assert setup.refresh_file.read_text().strip() not in (original, rotated)


async def test_rotated_token_that_cannot_be_stored_is_kept_in_memory(
    configs: ConfigWriter,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def disk_full(path: str, token: str) -> None:
        raise OSError(28, "No space left on device")

    with token_endpoint(rotate=True) as endpoint:
        async with mail_setup(configs, endpoint) as setup:
            original = setup.refresh_file.read_text()
            monkeypatch.setattr(oauth2, "store_refresh_token", disk_full)
            assert (await poll(setup)).ok
            assert setup.refresh_file.read_text() == original
            assert "cannot store the new refresh token" in caplog.text
            assert "No space left on device" in caplog.text
            clock.advance(3600)
            outcome = await poll(setup)  # the stored token is dead; the one in memory works
    assert outcome.ok, outcome.line()
    first, second = endpoint.grants("refresh_token")
    assert second["refresh_token"] != first["refresh_token"]
    assert_no_token_in(caplog.messages, endpoint)


async def test_revoked_grant_parks_the_account_without_a_request_storm(
    configs: ConfigWriter, endpoint: TokenEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with mail_setup(configs, endpoint, mailbox={1: MESSAGE}) as setup:
        endpoint.revoke_refresh_tokens()
        outcomes = [await poll(setup) for _ in range(3)]
        assert setup.refreshes() == 1  # asked once, never again for the same token
        for outcome in outcomes:
            assert isinstance(outcome.error, PermanentError), outcome.line()
            text = str(outcome.error)
            assert "the refresh token was revoked or expired: run `fetchd oauth2 login alice`" in (
                text
            )
            assert "127.0.0.1" in text and "invalid_grant" in text and "AADSTS70008" in text
        assert setup.server.connections == 3 and setup.server.logins == []
        assert_no_token_in([o.line() for o in outcomes] + caplog.messages, endpoint)
        # After a new sign-in stored another refresh token, it is used at once.
        setup.refresh_file.write_text(endpoint.issue_refresh_token(SCOPE) + "\n")
        outcome = await poll(setup)
    assert outcome.ok, outcome.line()
    assert setup.refreshes() == 2 and len(setup.sink.accepted) == 1


async def test_concurrent_connections_share_one_refresh(
    configs: ConfigWriter, endpoint: TokenEndpoint
) -> None:
    endpoint.delay = 0.3  # the refresh is still under way when the others want a token
    async with mail_setup(configs, endpoint) as setup:
        (account,) = load(setup.config).accounts
        state = await State.open(str(configs.directory / "state.sqlite3"))
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(Poller(account, state).poll() for _ in range(5))), 20
            )
        finally:
            await state.close()
    assert len(results) == 5
    assert setup.refreshes() == 1
    assert len(setup.server.logins) == 5 and all(x.ok for x in setup.server.logins)
    assert len({x.token for x in setup.server.logins}) == 1


async def test_token_source_shares_one_refresh_between_waiters(
    endpoint: TokenEndpoint, tmp_path: Path
) -> None:
    endpoint.delay = 0.2
    path = tmp_path / "refresh-token"
    oauth2.store_refresh_token(str(path), endpoint.issue_refresh_token(SCOPE))
    settings = OAuth2Settings(str(path), endpoint.token_url, CLIENT_ID, scope=SCOPE)
    source = oauth2.token_source(settings)
    assert oauth2.token_source(settings) is source
    tokens = await asyncio.gather(*(source.access_token("account t", "t", 5) for _ in range(10)))
    assert len(set(tokens)) == 1 and source.requests == 1
    assert len(endpoint.grants("refresh_token")) == 1


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
@pytest.mark.parametrize("mechanism", [b"AUTH=OAUTHBEARER", b"AUTH=XOAUTH2"])
async def test_wrong_scope_is_named_and_the_error_challenge_answered(
    configs: ConfigWriter,
    endpoint: TokenEndpoint,
    protocol: str,
    mechanism: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with mail_setup(
        configs, endpoint, protocol, mechanisms=mechanism, scope="https://mail.example/imap"
    ) as setup:
        outcome = await poll(setup)
    assert isinstance(outcome.error, PermanentError), outcome.line()
    text = str(outcome.error)
    assert "status 400" in text and "https://mail.example/imap" in text, text
    # RFC 7628 / Google's XOAUTH2: the error challenge is answered with \x01 or an empty line,
    # after which the server gives its final refusal.
    expected = b64(b"\x01") if mechanism == b"AUTH=OAUTHBEARER" else b""
    assert [x.dummy for x in setup.server.logins] == [expected, expected]
    # Refused once, refreshed once, refused again: then the account waits for a human.
    assert setup.refreshes() == 2 and setup.server.connections == 2
    assert_no_token_in([outcome.line(), *caplog.messages], endpoint)


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_refused_token_is_refreshed_once_and_the_login_retried(
    configs: ConfigWriter, endpoint: TokenEndpoint, protocol: str
) -> None:
    async with mail_setup(configs, endpoint, protocol, mailbox={1: MESSAGE}) as setup:
        assert (await poll(setup)).ok
        endpoint.expire_access_tokens()  # revoked early: fetchd still thinks it is fresh
        setup.server.mailbox[2] = MESSAGE
        outcome = await poll(setup)
    assert outcome.ok, outcome.line()
    assert [x.ok for x in setup.server.logins] == [True, False, True]
    assert setup.server.logins[1].token == setup.server.logins[0].token
    assert setup.server.logins[2].token != setup.server.logins[1].token
    assert setup.refreshes() == 2 and len(setup.sink.accepted) == 2


async def test_token_endpoint_trouble_is_temporary(
    configs: ConfigWriter, endpoint: TokenEndpoint
) -> None:
    endpoint.script.append((503, "Service Unavailable"))
    async with mail_setup(configs, endpoint) as setup:
        outcome = await poll(setup)
        assert isinstance(outcome.error, TemporaryError), outcome.line()
        assert "token endpoint 127.0.0.1" in str(outcome.error) and "503" in str(outcome.error)
        assert setup.server.logins == []
        assert (await poll(setup)).ok  # not remembered: the next poll asks again


async def test_unreachable_token_endpoint_is_temporary(configs: ConfigWriter) -> None:
    with token_endpoint() as endpoint:
        pass  # stopped: nothing listens on its port any more
    async with mail_setup(configs, endpoint) as setup:
        outcome = await poll(setup)
    assert isinstance(outcome.error, TemporaryError), outcome.line()
    assert "cannot reach the token endpoint 127.0.0.1" in str(outcome.error)


async def test_refused_client_is_permanent(configs: ConfigWriter) -> None:
    with token_endpoint(client_secret="right") as endpoint:
        async with mail_setup(configs, endpoint) as setup:
            outcome = await poll(setup)
            assert isinstance(outcome.error, PermanentError), outcome.line()
            assert "invalid_client" in str(outcome.error)
            await poll(setup)
            assert setup.refreshes() == 1


async def test_no_refresh_token_yet_says_how_to_get_one(
    configs: ConfigWriter, endpoint: TokenEndpoint
) -> None:
    async with mail_setup(configs, endpoint, refresh_token=False) as setup:
        outcome = await poll(setup)
    assert isinstance(outcome.error, PermanentError), outcome.line()
    assert "no refresh token in" in str(outcome.error)
    assert "run `fetchd oauth2 login alice`" in str(outcome.error)
    assert endpoint.requests == []


# ---------------------------------------------------------------------------------------------
# fetchd oauth2 login


def login_config(configs: ConfigWriter, endpoint: TokenEndpoint, **oauth: Any) -> Path:
    refresh_file = configs.directory / "alice.refresh-token"
    account = account_for(endpoint, "imap", 1, 1, refresh_file, oauth2=oauth)
    return configs.write([account])


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waited: list[float] = []

    async def no_wait(seconds: float) -> None:
        waited.append(seconds)

    monkeypatch.setattr(oauth2, "_sleep", no_wait)
    return waited


def test_device_flow_stores_the_refresh_token(
    configs: ConfigWriter,
    endpoint: TokenEndpoint,
    sleeps: list[float],
    capsys: pytest.CaptureFixture[str],
) -> None:
    endpoint.device_script = ["authorization_pending", "slow_down", "authorization_pending"]
    config = login_config(configs, endpoint)
    assert cli.main(["oauth2", "login", "alice", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert endpoint.base + "/device" in out and "WDJB-MJHT" in out
    assert sleeps == [5, 5, 10, 10]  # the interval, then 5 s more after slow_down
    (device_request,) = [f for p, f in endpoint.requests if p == "/devicecode"]
    assert device_request == {"client_id": CLIENT_ID, "scope": SCOPE}
    stored = (configs.directory / "alice.refresh-token").read_text().strip()
    assert stored in endpoint.refresh_tokens
    mode = (configs.directory / "alice.refresh-token").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert stored not in out
    # The daemon takes it from there.
    (account,) = load(config).accounts
    assert account.oauth2 is not None
    source = oauth2.TokenSource(account.oauth2)
    token = asyncio.run(source.access_token("account alice", "alice", 5))
    assert endpoint.check(token, SCOPE) is None
    assert endpoint.grants("refresh_token")[0]["refresh_token"] == stored


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("expired_token", "the code expired before the sign-in"),
        ("access_denied", "the sign-in was declined"),
        ("authorization_declined", "the sign-in was declined"),
    ],
)
def test_device_flow_failures(
    configs: ConfigWriter,
    endpoint: TokenEndpoint,
    sleeps: list[float],
    capsys: pytest.CaptureFixture[str],
    error: str,
    expected: str,
) -> None:
    endpoint.device_script = ["authorization_pending", error]
    config = login_config(configs, endpoint)
    assert cli.main(["oauth2", "login", "alice", "-c", str(config)]) == 1
    assert expected in capsys.readouterr().err
    assert not (configs.directory / "alice.refresh-token").exists()
    assert len(sleeps) == 2


class Screen(io.StringIO):
    """stdout for a login running in a thread: tells when the address to open was printed."""

    def __init__(self) -> None:
        super().__init__()
        self.printed = threading.Event()

    def write(self, text: str) -> int:
        n = super().write(text)
        if "/authorize?" in self.getvalue():
            self.printed.set()
        return n


def browser_login(
    config: Path, monkeypatch: pytest.MonkeyPatch, flow: list[str] | None = None
) -> tuple[threading.Thread, Screen, list[int]]:
    screen = Screen()
    monkeypatch.setattr("sys.stdout", screen)
    status: list[int] = []
    args = ["oauth2", "login", "alice", "-c", str(config), *(flow or ["--flow", "browser"])]
    thread = threading.Thread(target=lambda: status.append(cli.main(args)), daemon=True)
    thread.start()
    assert screen.printed.wait(10), screen.getvalue()
    return thread, screen, status


def visit(url: str) -> tuple[int, str]:
    """A GET as the browser makes it when it comes back to the loopback redirect."""
    assert url.startswith("http://127.0.0.1:"), url
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def address_in(screen: Screen) -> str:
    (line,) = [w for w in screen.getvalue().split() if "/authorize?" in w]
    return line


def test_browser_flow_with_pkce_stores_the_refresh_token(
    configs: ConfigWriter, endpoint: TokenEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = login_config(configs, endpoint)
    thread, screen, status = browser_login(config, monkeypatch)
    redirect, code, state = endpoint.authorize(address_in(screen))
    # An answer that does not carry this sign-in's state is turned away; the wait goes on.
    assert visit(f"{redirect}?code=stolen&state=forged")[0] == 400
    assert visit(f"{redirect.rstrip('/')}/favicon.ico")[0] == 404
    assert thread.is_alive()
    answer = visit(f"{redirect}?code={code}&state={state}")
    assert answer[0] == 200 and "You can close this window" in answer[1]
    thread.join(10)
    assert status == [0], screen.getvalue()
    stored = (configs.directory / "alice.refresh-token").read_text().strip()
    assert stored in endpoint.refresh_tokens
    (exchange,) = endpoint.grants("authorization_code")
    assert exchange["code"] == code and exchange["redirect_uri"] == redirect
    assert 43 <= len(exchange["code_verifier"]) <= 128


def test_browser_flow_is_the_default_without_a_device_endpoint(
    configs: ConfigWriter, endpoint: TokenEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = login_config(configs, endpoint, device_authorization_url=None)
    thread, screen, status = browser_login(config, monkeypatch, flow=[])
    redirect, _, state = endpoint.authorize(address_in(screen))
    visit(f"{redirect}?error=access_denied&error_description=no+thanks&state={state}")
    thread.join(10)
    assert status == [1]
    assert not (configs.directory / "alice.refresh-token").exists()


def test_login_for_an_account_without_refresh_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "token").write_text("at\n")
    config = write_yaml(tmp_path, {"token_file": "token"})
    assert cli.main(["oauth2", "login", "work", "-c", str(config)]) == 2
    assert "refresh_token_file" in capsys.readouterr().err
    assert cli.main(["oauth2", "login", "nobody", "-c", str(config)]) == 2
    assert "no account named 'nobody'" in capsys.readouterr().err


async def test_an_endpoint_quoting_the_form_back_leaks_no_secret(
    configs: ConfigWriter, endpoint: TokenEndpoint
) -> None:
    """Google refresh tokens hold "/" and "+": quoted back in an error, they look different."""
    async with mail_setup(configs, endpoint, mailbox={1: MESSAGE}) as setup:
        token = "1//0gAbC+dEf/GhI=="
        setup.refresh_file.write_text(token + "\n")
        echo = f"grant_type=refresh_token&refresh_token={urllib.parse.quote_plus(token)}"
        error = {"error": "invalid_request", "error_description": f"bad body: {echo}"}
        endpoint.script = [(400, json.dumps(error))]
        outcome = await poll(setup)
    text = outcome.line()
    assert "invalid_request" in text and "bad body" in text, text
    assert urllib.parse.quote_plus(token) not in text and token not in text
