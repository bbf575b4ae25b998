"""OAuth2 access tokens for mail accounts: kept fresh from a refresh token, and the one-time
sign-in (``fetchd oauth2 login``) that stores that refresh token.

Standards: RFC 6749 (the refresh-token and authorization-code grants), RFC 7636 (PKCE),
RFC 8628 (the device grant) and RFC 8252 (a loopback redirect for programs without a web
server). Only token endpoints are spoken to over HTTP. Tokens and the client secret never
appear in a log line or an error message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import ssl
import stat
import sys
import tempfile
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from fetchd.config import Account, Config, OAuth2Settings, Secret, TLSSettings
from fetchd.errors import FetchdError, PermanentError, TemporaryError
from fetchd.tls import build_context

log = logging.getLogger("fetchd.oauth2")

REFRESH_MARGIN = 300.0  # an access token with less than this left is refreshed before use
DEFAULT_LIFETIME = 3600.0  # when the token endpoint does not say (expires_in is optional)
MAX_RESPONSE = 64 * 1024  # bytes read from a token endpoint; real answers are a few KB
LOGIN_TIMEOUT = 600.0  # seconds the browser sign-in may take
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"

# Replaceable, so that token lifetimes and device-flow polling can be checked without waiting.
_now: Callable[[], float] = time.monotonic
_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


def login_hint(name: str) -> str:
    return f"run `fetchd oauth2 login {name}`"


# ---------------------------------------------------------------------------------------------
# The refresh token on disk


def read_refresh_token(path: str) -> str | None:
    """The stored refresh token, or None when there is none yet. OSError and ValueError say
    why the file cannot be used."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(64 * 1024)
    except FileNotFoundError:
        return None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ValueError(f"{path} is readable or writable by everyone: chmod 600 it")
    token = raw.decode("utf-8").strip()
    if not token:
        return None
    if any(c in token for c in "\r\n\0"):
        raise ValueError(f"{path} holds more than one line, or a NUL byte")
    return token


def store_refresh_token(path: str, token: str) -> None:
    """Replace the stored refresh token atomically: a crash leaves the old one or the new one,
    never a torn file. The file is mode 0600 from its creation on."""
    directory = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(prefix=".fetchd-oauth2-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Talking to a token endpoint


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """Verified TLS with the system's CAs, as for mail servers. A context of its own: the
    HTTP library sets ALPN on the context it is given, which must not reach mail servers."""
    return build_context(TLSSettings())


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).hostname or url


def _quote_plus(text: str) -> str:
    return urllib.parse.quote_plus(text)


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _clean(text: str, hide: list[str], limit: int = 300) -> str:
    """Server text made safe for a log line: the first line, printable, bounded, secrets out."""
    # Also as they look inside a form body an endpoint may quote back (a Google refresh
    # token holds "/" and "+", which the form encodes).
    forms = {f(item) for item in hide if item for f in (str, _quote_plus, _quote)}
    for item in sorted(forms, key=len, reverse=True):
        text = text.replace(item, "********")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return "".join(c if c.isprintable() else "?" for c in first)[:limit]


def _reason(error: BaseException) -> str:
    """The root cause of a connection failure, in a few words."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"its certificate is not trusted ({cause.verify_message})"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return str(error) or type(error).__name__


async def _post(
    url: str, form: dict[str, str], *, where: str, io_timeout: float, hide: list[str]
) -> tuple[int, dict[str, Any]]:
    """POST a form to a token endpoint; its status and JSON object.

    Unreachable, too slow, overloaded (5xx, 429) or answering 200 with something that is not
    JSON: TemporaryError. A redirect or a 4xx without an OAuth error: PermanentError.
    """
    host = _host(url)
    try:
        async with (
            asyncio.timeout(io_timeout * 2),
            httpx.AsyncClient(
                timeout=io_timeout, verify=_tls_context(), trust_env=False, follow_redirects=False
            ) as client,
            client.stream(
                # identity: a compressed answer would be inflated before the size cap applies
                "POST",
                url,
                data=form,
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
            ) as response,
        ):
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_RESPONSE:
                    raise TemporaryError(
                        f"{where}: the token endpoint {host} sent more than {MAX_RESPONSE} bytes"
                    )
            status = response.status_code
            location = response.headers.get("location", "")
    except (TimeoutError, httpx.TimeoutException):
        raise TemporaryError(
            f"{where}: the token endpoint {host} did not answer within {io_timeout:g} s"
        ) from None
    except httpx.HTTPError as e:
        reason = _reason(e)
        failed = PermanentError if "certificate" in reason else TemporaryError
        raise failed(f"{where}: cannot reach the token endpoint {host}: {reason}") from None
    if 300 <= status < 400:
        target = _host(location) if location else "nowhere"  # never the query: it may echo
        raise PermanentError(
            f"{where}: the token endpoint {host} redirects (HTTP {status}) to "
            f"{_clean(target, hide, 200)}: check the token URL"
        )
    if status >= 500 or status in (408, 429):
        raise TemporaryError(f"{where}: the token endpoint {host} is unwell (HTTP {status})")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict):
        if 200 <= status < 300:
            raise TemporaryError(
                f"{where}: the token endpoint {host} answered with something that is not JSON"
            )
        raise PermanentError(
            f"{where}: the token endpoint {host} answered HTTP {status}, not an OAuth answer: "
            "check the token URL"
        )
    return status, data


def _error_of(data: dict[str, Any], hide: list[str]) -> tuple[str, str]:
    """The OAuth error code, and the code with its description for a message."""
    code = _clean(str(data.get("error") or "unknown_error"), hide, 60)
    description = _clean(str(data.get("error_description") or ""), hide)
    return code, f"{code}: {description}" if description else code


def _tokens(data: dict[str, Any], where: str, host: str) -> tuple[str, float, str | None]:
    """(access token, lifetime in seconds, refresh token or None) of a successful answer."""
    access = data.get("access_token")
    if not isinstance(access, str) or not access or any(c in access for c in "\r\n\0\x01 "):
        raise TemporaryError(f"{where}: the token endpoint {host} sent no usable access token")
    kind = data.get("token_type", "Bearer")
    if not isinstance(kind, str) or kind.lower() != "bearer":
        raise PermanentError(
            f"{where}: the token endpoint {host} issued a {_clean(str(kind), [access], 40)!r} "
            "token; mail servers take Bearer tokens only"
        )
    lifetime = DEFAULT_LIFETIME
    raw = data.get("expires_in")
    with contextlib.suppress(TypeError, ValueError):
        if raw is not None and float(raw) > 0:
            lifetime = float(raw)
    refresh = data.get("refresh_token")
    if not isinstance(refresh, str) or not refresh.strip() or any(c in refresh for c in "\r\n\0"):
        refresh = None
    return access, lifetime, refresh


# ---------------------------------------------------------------------------------------------
# Access tokens, refreshed as needed and shared between connections


class TokenSource:
    """The access token of one refresh token file.

    The token is kept in memory and refreshed when less than ``REFRESH_MARGIN`` (or half its
    lifetime, for short-lived ones) is left, or when a server refused it. The lock makes
    concurrent connections wait for one refresh instead of each asking for its own. A refresh
    token the endpoint refused for good is remembered (by digest): nothing is asked again until
    the file holds another one, so a revoked grant does not make a request storm.
    """

    def __init__(self, settings: OAuth2Settings) -> None:
        self.settings = settings
        self.lock = asyncio.Lock()
        self.requests = 0  # refresh requests sent
        self._access: Secret | None = None
        self._expires = 0.0
        self._lifetime = 0.0
        self._refused: tuple[str, str] | None = None  # (digest, why)
        # A rotated refresh token that could not be written back: (digest of the stored one it
        # replaces, the new one). Used as long as the file still holds the old one.
        self._unsaved: tuple[str, Secret] | None = None

    def reconfigure(self, settings: OAuth2Settings) -> None:
        """After a reload that changed the client or the endpoints: forget what they issued."""
        self.settings = settings
        self._access = None
        self._refused = None

    def _fresh(self) -> bool:
        if self._access is None:
            return False
        margin = min(REFRESH_MARGIN, self._lifetime / 2)
        return _now() < self._expires - margin

    async def access_token(
        self, where: str, name: str, io_timeout: float, *, rejected: str | None = None
    ) -> str:
        """A valid access token. ``rejected``: a server just refused this one; unless another
        connection has already replaced it, a new one is fetched."""
        async with self.lock:
            current = self._access
            if current is not None and self._fresh() and current.reveal() != rejected:
                return current.reveal()
            return await self._refresh(where, name, io_timeout)

    async def _refresh(self, where: str, name: str, io_timeout: float) -> str:
        s = self.settings
        path = s.refresh_token_file
        try:
            stored = await asyncio.to_thread(read_refresh_token, path)
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise PermanentError(f"{where}: cannot read the refresh token file: {reason}") from None
        if stored is None:
            raise PermanentError(f"{where}: no refresh token in {path} yet: {login_hint(name)}")
        token = stored
        if self._unsaved is not None:
            if self._unsaved[0] == _digest(stored):
                token = self._unsaved[1].reveal()
            else:
                self._unsaved = None  # the file was replaced since: it wins
        if self._refused is not None and self._refused[0] == _digest(token):
            raise PermanentError(f"{where}: {self._refused[1]}")
        form = {"grant_type": "refresh_token", "refresh_token": token, "client_id": s.client_id}
        if s.scope:
            form["scope"] = s.scope
        hide = [token]
        if s.client_secret is not None:
            form["client_secret"] = s.client_secret.reveal()
            hide.append(form["client_secret"])
        host = _host(s.token_url)
        self.requests += 1
        status, data = await _post(s.token_url, form, where=where, io_timeout=io_timeout, hide=hide)
        if not 200 <= status < 300:  # a 4xx: _post raised for the others
            code, text = _error_of(data, hide)
            if code == "invalid_grant":
                reason = (
                    f"the refresh token was revoked or expired: {login_hint(name)} "
                    f"({host} said {text})"
                )
            else:  # e.g. invalid_client: the configuration needs a change
                reason = f"the token endpoint {host} refused to refresh the token: {text}"
            self._refused = (_digest(token), reason)
            self._access = None
            raise PermanentError(f"{where}: {reason}")
        access, lifetime, rotated = _tokens(data, where, host)
        self._access = Secret(access)
        self._lifetime = lifetime
        self._expires = _now() + lifetime
        log.debug("%s: new OAuth2 access token, valid for %.0f s", where, lifetime)
        if rotated is not None and rotated != token:
            await self._save(where, stored, rotated)
        return access

    async def _save(self, where: str, stored: str, rotated: str) -> None:
        """Write a rotated refresh token back; the old one may stop working any time now."""
        path = self.settings.refresh_token_file
        try:
            await asyncio.to_thread(store_refresh_token, path, rotated)
        except OSError as e:
            self._unsaved = (_digest(stored), Secret(rotated))
            log.error(
                "%s: cannot store the new refresh token in %s: %s; it is kept in memory only, "
                "and lost when fetchd stops",
                where,
                path,
                e.strerror or e,
            )
            return
        self._unsaved = None
        log.info("%s: stored the new refresh token the token endpoint issued", where)


_sources: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, TokenSource]] = (
    weakref.WeakKeyDictionary()
)


def token_source(settings: OAuth2Settings) -> TokenSource:
    """The one source of this refresh token file (in this event loop), so that every
    connection of an account, and every account sharing the file, shares its refreshes."""
    sources = _sources.setdefault(asyncio.get_running_loop(), {})
    source = sources.get(settings.refresh_token_file)
    if source is None:
        source = sources[settings.refresh_token_file] = TokenSource(settings)
    elif source.settings != settings:
        source.reconfigure(settings)
    return source


# ---------------------------------------------------------------------------------------------
# `fetchd oauth2 login`: the one-time sign-in


def login_command(config: Config, name: str, flow: str | None) -> int:
    """Sign in for account ``name`` and store its first refresh token; the exit status."""
    account = next((a for a in config.accounts if a.name == name), None)
    if account is None:
        names = ", ".join(a.name for a in config.accounts)
        print(
            f"fetchd oauth2 login: {config.path} has no account named {name!r} (it has: {names})",
            file=sys.stderr,
        )
        return 2
    if account.oauth2 is None:
        print(
            f"fetchd oauth2 login: account {name} does not let fetchd refresh its token: give "
            "it auth: oauth2 and an oauth2: block with refresh_token_file (see docs/oauth2.md)",
            file=sys.stderr,
        )
        return 2
    try:
        path = asyncio.run(login(account, flow))
    except FetchdError as e:
        print(f"fetchd oauth2 login: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(
        f"Stored the refresh token in {path}.\n"
        f"`fetchd once -c {config.path}` tries it now; reload a running fetchd "
        "(systemctl reload fetchd) so that it polls this account again at once."
    )
    return 0


def _say(text: str) -> None:
    print(text, flush=True)


async def login(
    account: Account, flow: str | None = None, say: Callable[[str], None] = _say
) -> str:
    """Sign in with the device flow or in a browser, and store the refresh token it yields;
    the file it was stored in. ``flow`` None: the device flow when the provider has one."""
    s = account.oauth2
    if s is None:
        raise PermanentError(f"account {account.name} has no oauth2: refresh_token_file")
    where = f"account {account.where()}"
    flow = flow or ("device" if s.device_authorization_url else "browser")
    if flow == "device":
        data = await _device_flow(account, s, where, say)
    else:
        data = await _browser_flow(account, s, where, say)
    host = _host(s.token_url)
    _, _, refresh = _tokens(data, where, host)
    if refresh is None:
        raise PermanentError(
            f"{where}: the token endpoint {host} issued no refresh token; for Microsoft the "
            "scope must include offline_access, and Google issues one only with "
            "access_type=offline (provider: google asks for it)"
        )
    try:
        await asyncio.to_thread(store_refresh_token, s.refresh_token_file, refresh)
    except OSError as e:
        raise PermanentError(
            f"{where}: cannot store the refresh token in {s.refresh_token_file}: {e.strerror or e}"
        ) from None
    return s.refresh_token_file


def _client_form(s: OAuth2Settings) -> tuple[dict[str, str], list[str]]:
    form = {"client_id": s.client_id}
    hide: list[str] = []
    if s.client_secret is not None:
        form["client_secret"] = s.client_secret.reveal()
        hide.append(form["client_secret"])
    return form, hide


async def _device_flow(
    account: Account, s: OAuth2Settings, where: str, say: Callable[[str], None]
) -> dict[str, Any]:
    """RFC 8628: show a code to enter on another device, then poll until the user signed in."""
    if not s.device_authorization_url:
        raise PermanentError(
            f"{where}: no device_authorization_url is configured (Google offers no device "
            "sign-in for mail): use --flow browser"
        )
    base, hide = _client_form(s)
    form = dict(base, scope=s.scope) if s.scope else dict(base)
    device_host = _host(s.device_authorization_url)
    status, data = await _post(
        s.device_authorization_url, form, where=where, io_timeout=account.timeout, hide=hide
    )
    if status != 200:
        _, text = _error_of(data, hide)
        raise PermanentError(f"{where}: {device_host} refused to start the sign-in: {text}")
    device_code = data.get("device_code")
    user_code = data.get("user_code")
    # Google spells it verification_url.
    uri = data.get("verification_uri") or data.get("verification_url")
    if not all(isinstance(v, str) and v for v in (device_code, user_code, uri)):
        raise PermanentError(f"{where}: {device_host} sent no device code, user code or URL")
    assert isinstance(device_code, str)
    hide.append(device_code)
    expires_in = _seconds(data.get("expires_in"), 900.0)
    interval = _seconds(data.get("interval"), 5.0)
    say(
        f"To let fetchd read the mail of account {account.name} ({account.user}):\n"
        f"  open  {_clean(str(uri), hide, 500)}\n"
        f"  and enter the code  {_clean(str(user_code), hide, 100)}\n"
        f"Waiting for the sign-in (the code is valid for {expires_in / 60:.0f} minutes)..."
    )
    deadline = _now() + expires_in
    host = _host(s.token_url)
    form = dict(base, grant_type=DEVICE_GRANT, device_code=device_code)
    while True:
        await _sleep(interval)
        if _now() > deadline:
            raise PermanentError(f"{where}: the code expired before the sign-in: run it again")
        try:
            status, data = await _post(
                s.token_url, form, where=where, io_timeout=account.timeout, hide=hide
            )
        except TemporaryError as e:
            interval = min(interval * 2, 60.0)  # RFC 8628 §3.5: back off, keep polling
            log.warning("%s; asking again in %.0f s", e, interval)
            continue
        if status == 200:
            return data
        code, text = _error_of(data, hide)
        if code == "authorization_pending":
            continue
        if code == "slow_down":
            interval += 5.0
            continue
        if code == "expired_token":
            raise PermanentError(f"{where}: the code expired before the sign-in: run it again")
        if code in ("access_denied", "authorization_declined"):  # the latter: Microsoft's
            raise PermanentError(f"{where}: the sign-in was declined ({host} said {text})")
        raise PermanentError(f"{where}: {host} refused the sign-in: {text}")


def _seconds(value: Any, default: float) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return default
    return seconds if 0 <= seconds <= 86400 else default


async def _browser_flow(
    account: Account, s: OAuth2Settings, where: str, say: Callable[[str], None]
) -> dict[str, Any]:
    """Authorization code with PKCE: the browser signs in and comes back to a one-shot web
    server on 127.0.0.1, which takes the code only with the ``state`` this sign-in sent."""
    if not s.authorization_url:
        raise PermanentError(f"{where}: no authorization_url is configured: use --flow device")
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    state = secrets.token_urlsafe(24)
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[str] = loop.create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, page = await _redirect_answer(reader, state, outcome, where)
            body = f"<!doctype html><title>fetchd</title><p>{page}</p>\n".encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                "Cache-Control: no-store\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        redirect_uri = f"http://127.0.0.1:{port}/"
        query = {
            "response_type": "code",
            "client_id": s.client_id,
            "redirect_uri": redirect_uri,
            "state": state,
            "code_challenge": challenge.rstrip(b"=").decode("ascii"),
            "code_challenge_method": "S256",
            **({"scope": s.scope} if s.scope else {}),
            **dict(s.authorization_params),
        }
        joiner = "&" if "?" in s.authorization_url else "?"
        url = s.authorization_url + joiner + urllib.parse.urlencode(query)
        say(
            f"To let fetchd read the mail of account {account.name} ({account.user}), "
            f"open this address in a browser:\n\n  {url}\n\n"
            f"Waiting for the browser to come back to {redirect_uri} ..."
        )
        try:
            async with asyncio.timeout(LOGIN_TIMEOUT):
                code = await outcome
        except TimeoutError:
            raise PermanentError(
                f"{where}: no sign-in came back within {LOGIN_TIMEOUT / 60:.0f} minutes"
            ) from None
    finally:
        server.close()
    base, hide = _client_form(s)
    hide += [code, verifier]
    form = dict(
        base,
        grant_type="authorization_code",
        code=code,
        redirect_uri=redirect_uri,
        code_verifier=verifier,
    )
    status, data = await _post(
        s.token_url, form, where=where, io_timeout=account.timeout, hide=hide
    )
    if status != 200:
        _, text = _error_of(data, hide)
        raise PermanentError(f"{where}: {_host(s.token_url)} refused the sign-in: {text}")
    return data


async def _redirect_answer(
    reader: asyncio.StreamReader, state: str, outcome: asyncio.Future[str], where: str
) -> tuple[str, str]:
    """Read one request to the loopback redirect; settle ``outcome`` when it carries this
    sign-in's answer. The HTTP status and page to send back."""
    try:
        async with asyncio.timeout(30):
            head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return "400 Bad Request", "Bad request."
    words = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    if len(words) != 3 or words[0] != "GET":
        return "405 Method Not Allowed", "Only GET is served here."
    target = urllib.parse.urlsplit(words[1])
    if target.path != "/":
        return "404 Not Found", "Not found."
    params = urllib.parse.parse_qs(target.query)
    got = params.get("state", [""])[0]
    if not hmac.compare_digest(got.encode(), state.encode()):
        return "400 Bad Request", "This answer does not belong to the sign-in fetchd waits for."
    if outcome.done():
        return "200 OK", "fetchd has its answer already. You can close this window."
    if "error" in params:
        code = _clean(params["error"][0], [], 60)
        detail = _clean(params.get("error_description", [""])[0], [])
        reason = f"{code}: {detail}" if detail else code
        outcome.set_exception(PermanentError(f"{where}: the sign-in was refused ({reason})"))
        return "200 OK", "The sign-in was refused; fetchd stopped waiting."
    code_value = params.get("code", [""])[0]
    if not code_value:
        return "400 Bad Request", "The answer holds no authorization code."
    outcome.set_result(code_value)
    return "200 OK", "fetchd received the authorization. You can close this window."
