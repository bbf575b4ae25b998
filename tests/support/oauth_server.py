"""A fake OAuth2 authorization server on loopback HTTP: the refresh-token, device-code and
authorization-code grants (PKCE checked), scripted failures, and a record of every request.

It runs ``http.server`` in a thread, so it answers fetchd's event loop as well as code that runs
its own (``fetchd oauth2 login`` calls asyncio.run). Mail servers in the tests ask it whether an
access token is one it issued and still honours, as a real provider's servers would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CLIENT_ID = "fetchd-test-client"


@dataclass
class AccessToken:
    scope: str
    valid: bool = True


class TokenEndpoint:
    """The provider's side. Tokens are long, like real ones (Microsoft's run to 2 KB)."""

    def __init__(
        self,
        *,
        client_secret: str | None = None,
        lifetime: int = 3600,
        rotate: bool = False,
        interval: int = 5,
    ) -> None:
        self.client_secret = client_secret
        self.lifetime = lifetime
        self.rotate = rotate
        self.interval = interval
        self.lock = threading.Lock()
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, form) of every POST
        self.refresh_tokens: dict[str, str] = {}  # valid refresh token -> its scope
        self.access_tokens: dict[str, AccessToken] = {}
        self.script: list[tuple[int, str]] = []  # (status, body) answers to give first
        self.device_script: list[str] = []  # errors the device grant gives before success
        self.device_codes: dict[str, str] = {}  # device code -> scope
        self.codes: dict[str, tuple[str, str, str]] = {}  # code -> (challenge, redirect, scope)
        self.delay = 0.0  # seconds before each answer
        self.port = 0

    # -- addresses --------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return self.base + "/token"

    @property
    def device_url(self) -> str:
        return self.base + "/devicecode"

    @property
    def authorization_url(self) -> str:
        return self.base + "/authorize"

    # -- the provider's state ---------------------------------------------------------------

    def issue_refresh_token(self, scope: str = "") -> str:
        token = "rt-" + secrets.token_urlsafe(48)
        with self.lock:
            self.refresh_tokens[token] = scope
        return token

    def revoke_refresh_tokens(self) -> None:
        with self.lock:
            self.refresh_tokens.clear()

    def expire_access_tokens(self) -> None:
        with self.lock:
            for token in self.access_tokens.values():
                token.valid = False

    def check(self, token: str, scope: str) -> str | None:
        """None when a mail server should accept ``token`` for ``scope``; else the RFC 7628
        status to report."""
        with self.lock:
            issued = self.access_tokens.get(token)
        if issued is None or not issued.valid:
            return "401"
        if scope not in issued.scope.split():
            return "400"
        return None

    def grants(self, grant_type: str) -> list[dict[str, str]]:
        with self.lock:
            return [f for _, f in self.requests if f.get("grant_type") == grant_type]

    def authorize(self, url: str) -> tuple[str, str, str]:
        """What a browser does after the user agreed: check the request, issue a code, and
        return the redirect URI, the code and the state to send it back to."""
        parts = urllib.parse.urlsplit(url)
        assert url.startswith(self.authorization_url + "?"), url
        query = dict(urllib.parse.parse_qsl(parts.query, strict_parsing=True))
        assert query["response_type"] == "code" and query["client_id"] == CLIENT_ID, query
        assert query["code_challenge_method"] == "S256", query
        assert len(query["code_challenge"]) == 43, query  # base64url of SHA-256, no padding
        redirect = urllib.parse.urlsplit(query["redirect_uri"])
        assert redirect.scheme == "http" and redirect.hostname == "127.0.0.1", query
        code = "code-" + secrets.token_urlsafe(16)
        with self.lock:
            self.codes[code] = (
                query["code_challenge"],
                query["redirect_uri"],
                query.get("scope", ""),
            )
        return query["redirect_uri"], code, query["state"]

    # -- HTTP -------------------------------------------------------------------------------

    def answer(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any] | str]:
        with self.lock:
            self.requests.append((path, form))
            if self.script:
                return self.script.pop(0)
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != self.client_secret:
            return 401, {"error": "invalid_client", "error_description": "unknown client"}
        if path == "/devicecode":
            code = "dc-" + secrets.token_urlsafe(16)
            with self.lock:
                self.device_codes[code] = form.get("scope", "")
            return 200, {
                "device_code": code,
                "user_code": "WDJB-MJHT",
                "verification_uri": self.base + "/device",
                "expires_in": 900,
                "interval": self.interval,
            }
        if path != "/token":
            return 404, "not here"
        grant = form.get("grant_type")
        if grant == "refresh_token":
            with self.lock:
                scope = self.refresh_tokens.get(form.get("refresh_token", ""))
                if scope is not None and self.rotate:
                    del self.refresh_tokens[form["refresh_token"]]
            if scope is None:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "AADSTS70008: The refresh token has expired or was "
                    "revoked.\r\nTrace ID: 0000\r\nTimestamp: 2024-01-01 00:00:00Z",
                }
            return 200, self._tokens(form.get("scope") or scope, new_refresh=self.rotate)
        if grant == "urn:ietf:params:oauth:grant-type:device_code":
            with self.lock:
                scope = self.device_codes.get(form.get("device_code", ""))
                step = self.device_script.pop(0) if self.device_script else None
            if scope is None:
                return 400, {"error": "invalid_grant"}
            if step is not None:
                return 400, {"error": step}
            return 200, self._tokens(scope, new_refresh=True)
        if grant == "authorization_code":
            with self.lock:
                issued = self.codes.pop(form.get("code", ""), None)
            if issued is None:
                return 400, {"error": "invalid_grant", "error_description": "unknown code"}
            challenge, redirect_uri, scope = issued
            verifier = form.get("code_verifier", "").encode()
            computed = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=")
            if computed.decode() != challenge or form.get("redirect_uri") != redirect_uri:
                return 400, {"error": "invalid_grant", "error_description": "PKCE or redirect"}
            return 200, self._tokens(scope, new_refresh=True)
        return 400, {"error": "unsupported_grant_type"}

    def _tokens(self, scope: str, *, new_refresh: bool) -> dict[str, Any]:
        access = "at-" + secrets.token_urlsafe(300)
        answer: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            "scope": scope,
        }
        with self.lock:
            self.access_tokens[access] = AccessToken(scope)
        if new_refresh:
            answer["refresh_token"] = self.issue_refresh_token(scope)
        return answer


@contextmanager
def token_endpoint(**kwargs: Any) -> Iterator[TokenEndpoint]:
    """A running endpoint on a free loopback port, stopped on exit."""
    endpoint = TokenEndpoint(**kwargs)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length).decode("utf-8")
            form = dict(urllib.parse.parse_qsl(raw, keep_blank_values=True))
            if endpoint.delay:
                time.sleep(endpoint.delay)
            status, body = endpoint.answer(self.path, form)
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            kind = "text/plain" if isinstance(body, str) else "application/json"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    endpoint.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
