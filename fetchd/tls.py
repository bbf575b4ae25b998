"""The one place where TLS is configured.

Every connection fetchd makes (POP3, IMAP, and SMTP delivery when asked) gets its SSLContext
from :func:`context_for`, so certificate checks cannot be forgotten in one code path. Contexts
are built once per distinct :class:`TLSSettings` and shared by every account that uses them.
"""

from __future__ import annotations

import ssl
from asyncio import StreamReader

from fetchd.config import Account, TLSSettings
from fetchd.errors import ConfigError, PermanentError, ProtocolError, TemporaryError

_contexts: dict[TLSSettings, ssl.SSLContext] = {}


def context_for(settings: TLSSettings) -> ssl.SSLContext | None:
    """The shared context for these settings, or None for an explicitly plaintext account."""
    if settings.mode == "none":
        return None
    ctx = _contexts.get(settings)
    if ctx is None:
        ctx = _contexts[settings] = build_context(settings)
    return ctx


def build_context(settings: TLSSettings) -> ssl.SSLContext:
    """A client context that verifies the chain and the host name, TLS 1.2 or newer."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if settings.ca_file:
            ctx.load_verify_locations(cafile=settings.ca_file)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load CA certificates from {settings.ca_file}: {e}") from None
    return ctx


def server_name(account: Account) -> str:
    """The name checked against the certificate and sent as SNI: never a resolved address."""
    return account.tls.server_name or account.host


def describe_tls_error(exc: BaseException, name: str) -> str:
    """Plain words for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or "verification failed"
        if exc.verify_code == 62 or "Hostname mismatch" in str(exc):
            reason = f"its certificate is not valid for the name {name}"
        return f"certificate of {name} not trusted: {reason}"
    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return f"TLS handshake with {name} failed: {reason}"


def translate_tls_error(exc: BaseException, name: str) -> Exception:
    """Certificate problems need a human; other handshake failures may pass on their own."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return PermanentError(describe_tls_error(exc, name))
    return TemporaryError(describe_tls_error(exc, name))


def ensure_no_buffered_plaintext(reader: StreamReader, where: str) -> None:
    """Refuse bytes a server sent after its STARTTLS reply but before the handshake.

    Such bytes were never encrypted, yet the stream would hand them out after the handshake as
    if they were (the response injection of CVE-2021-39272). asyncio offers no public way to
    peek at the buffer, hence the private attribute.
    """
    pending = getattr(reader, "_buffer", b"")
    if pending:
        raise ProtocolError(
            f"{where}: server sent {len(pending)} unencrypted bytes right after agreeing to "
            "STARTTLS; refusing the connection (possible injection attack)"
        )


def tls_description(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """E.g. ``TLSv1.3 TLS_AES_256_GCM_SHA384``, for logs and the Received header."""
    if ssl_object is None:
        return "plaintext"
    cipher = ssl_object.cipher()
    version = ssl_object.version() or "TLS"
    return f"{version} {cipher[0]}" if cipher else version
