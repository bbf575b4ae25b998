"""SASL mechanisms as pure step functions, shared by the POP3 and IMAP clients.

A mechanism has an optional initial response and answers each server challenge (decoded from
base64) with raw bytes (the client base64-encodes them). ``None`` means "cancel the exchange"
(the client sends ``*``). No I/O here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass, field

from fetchd.errors import PermanentError

# Strongest first: mechanisms that never reveal the password come before those that do.
PASSWORD_PREFERENCE = ("CRAM-MD5", "PLAIN", "LOGIN")
TOKEN_PREFERENCE = ("OAUTHBEARER", "XOAUTH2")


def preference(*, password: bool) -> tuple[str, ...]:
    return PASSWORD_PREFERENCE if password else TOKEN_PREFERENCE


class TokenRefused(PermanentError):
    """The server refused an OAuth access token (not the method, and not "busy, try later").

    The token may merely have expired or been revoked early: one refresh and one more try can
    help, where trying a refused password again would only lock the account.
    """


def refused(mechanism: Mechanism | None, message: str) -> PermanentError:
    """The error for credentials the server refused: TokenRefused for an access token."""
    if mechanism is not None and mechanism.kind in ("xoauth2", "oauthbearer"):
        return TokenRefused(message)
    return PermanentError(message)


def token_mechanism(offered: set[str]) -> str | None:
    """For ``auth: oauth2``: the token mechanism to use among those the server offers."""
    for name in TOKEN_PREFERENCE:
        if name in offered:
            return name.lower()
    return None


@dataclass
class Mechanism:
    name: str
    initial: bytes | None
    steps: list[bytes] = field(default_factory=list)
    kind: str = ""
    user: str = ""
    secret: str = ""
    error: str | None = None  # what an OAuth server said when it refused the token

    def respond(self, challenge: bytes) -> bytes | None:
        if self.kind == "cram-md5":
            if not challenge:
                return None
            digest = hmac.new(self.secret.encode(), challenge, hashlib.md5).hexdigest()
            return f"{self.user} {digest}".encode()
        if self.kind in ("xoauth2", "oauthbearer"):
            # After the initial response, a challenge is the server's error report (JSON).
            self.error = _oauth_error(challenge)
            return b"" if self.kind == "xoauth2" else b"\x01"
        if self.steps:
            return self.steps.pop(0)
        return None

    def secrets(self) -> list[str]:
        """Texts that must never appear in a log: the secret and every encoding of it."""
        out = [self.secret] if self.secret else []
        if self.initial:
            out.append(base64.b64encode(self.initial).decode("ascii"))
        out += [base64.b64encode(s).decode("ascii") for s in self.steps if s]
        return out


def decode_challenge(text: bytes) -> bytes | None:
    """The challenge after "+ ", or None when it is not base64."""
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def plain(user: str, password: str) -> Mechanism:
    return Mechanism("PLAIN", f"\0{user}\0{password}".encode(), kind="plain", secret=password)


def login(user: str, password: str) -> Mechanism:
    return Mechanism(
        "LOGIN", None, steps=[user.encode(), password.encode()], kind="login", secret=password
    )


def cram_md5(user: str, password: str) -> Mechanism:
    return Mechanism("CRAM-MD5", None, kind="cram-md5", user=user, secret=password)


def xoauth2(user: str, token: str) -> Mechanism:
    initial = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    return Mechanism("XOAUTH2", initial, kind="xoauth2", user=user, secret=token)


def oauthbearer(user: str, token: str) -> Mechanism:
    # RFC 5801's saslname: "," and "=" in the authorization identity are escaped.
    name = user.replace("=", "=3D").replace(",", "=2C")
    initial = f"n,a={name},\x01auth=Bearer {token}\x01\x01".encode()
    return Mechanism("OAUTHBEARER", initial, kind="oauthbearer", user=user, secret=token)


def make(name: str, user: str, secret: str) -> Mechanism:
    return {
        "PLAIN": plain,
        "LOGIN": login,
        "CRAM-MD5": cram_md5,
        "XOAUTH2": xoauth2,
        "OAUTHBEARER": oauthbearer,
    }[name](user, secret)


def _oauth_error(challenge: bytes) -> str:
    try:
        data = json.loads(challenge.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "the server refused the token"
    if not isinstance(data, dict):
        return "the server refused the token"
    status = str(data.get("status", "")).strip()[:40]
    scope = str(data.get("scope", "")).strip()[:200]
    text = "the server refused the token"
    if status:
        text += f" (status {status})"
    if scope:
        text += f"; it wants the scope {scope}"
    return "".join(c if c.isprintable() else "?" for c in text)


def apop_digest(timestamp: bytes, password: str) -> str:
    return hashlib.md5(timestamp + password.encode(), usedforsecurity=False).hexdigest()
