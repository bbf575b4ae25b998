"""The one place where TLS is configured and checked.

Every connection fetchd makes gets its SSLContext from :func:`context_for`, so certificate checks
cannot be forgotten in one code path. Contexts are built once per distinct
:class:`~fetchd.config.TLSSettings` and shared by every account that uses them.

After each handshake the protocol clients call :meth:`Security.check_peer`, which enforces the
fingerprint pins before any credential is sent. Certificates are read with ``cryptography``
(the ``ssl`` module cannot give the public key for SPKI pins, nor parse a certificate it did not
verify, which the error messages and ``fetchd probe`` need).
"""

from __future__ import annotations

import asyncio.sslproto
import base64
import hashlib
import logging
import ssl
import warnings
from asyncio import StreamReader
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fetchd.config import Account, TLSSettings
from fetchd.errors import ConfigError, PermanentError, ProtocolError, TemporaryError

log = logging.getLogger("fetchd.tls")

# asyncio gives every TLS connection a 256 KiB receive buffer, filled with zeros at once: 250 MiB
# for 1,000 idling IMAP connections. 32 KiB holds two full TLS records, and the throughput
# benchmark does not notice the difference.
_TLS_READ_BUFFER = 32 * 1024
if getattr(asyncio.sslproto.SSLProtocol, "max_size", 0) > _TLS_READ_BUFFER:
    asyncio.sslproto.SSLProtocol.max_size = _TLS_READ_BUFFER
_contexts: dict[TLSSettings, ssl.SSLContext] = {}
_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


class CertificateError(PermanentError):
    """The server's certificate was refused; ``verify_code`` is OpenSSL's reason, if any."""

    def __init__(self, message: str, verify_code: int | None = None) -> None:
        super().__init__(message)
        self.verify_code = verify_code


def context_for(settings: TLSSettings) -> ssl.SSLContext | None:
    """The shared context for these settings, or None for an explicitly plaintext account."""
    if settings.mode == "none":
        return None
    ctx = _contexts.get(settings)
    if ctx is None:
        ctx = _contexts[settings] = build_context(settings)
    return ctx


def build_context(settings: TLSSettings) -> ssl.SSLContext:
    """A client context: chain and host name verified unless ``verify`` is off; TLS ≥ 1.2 unless
    an older minimum was asked for."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated; asked for explicitly here
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = _VERSIONS[settings.min_version]
        if settings.max_version:
            ctx.maximum_version = _VERSIONS[settings.max_version]
    if settings.min_version in ("TLSv1", "TLSv1.1"):
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses them at its default level
    what = "CA certificates"
    try:
        if settings.verify:
            if settings.system_ca:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
            if settings.ca_file:
                ctx.load_verify_locations(cafile=settings.ca_file)
            if settings.ca_path:
                ctx.load_verify_locations(capath=settings.ca_path)
            what = f"the CRL file {settings.crl_file}"
            if settings.crl_file:
                _check_crl_only(settings.crl_file)
                ctx.load_verify_locations(cafile=settings.crl_file)
            if settings.crl_check == "leaf":
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            elif settings.crl_check == "chain":
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if settings.client_cert:
            what = (
                f"the client certificate {settings.client_cert} and its key (is the key "
                "passphrase right, and do they belong together?)"
            )
            password = settings.client_key_password
            ctx.load_cert_chain(
                settings.client_cert,
                settings.client_key,
                password=password.reveal() if password else None,
            )
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load {what}: {getattr(e, 'reason', None) or e}") from None
    return ctx


def _check_crl_only(path: str) -> None:
    """A CRL file must hold CRLs only: OpenSSL would trust a CA certificate slipped into it,
    and CRLs are often fetched over plain HTTP because they are signed."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the CRL file {path}: {e.strerror}") from None
    if b"-----BEGIN" in data and b"CERTIFICATE-----" in data:
        raise ConfigError(
            f"the CRL file {path} also holds certificates, which would be trusted as CAs; "
            "keep only the CRLs there and put CA certificates in ca_file"
        )
    if b"-----BEGIN X509 CRL-----" not in data:
        raise ConfigError(f"the CRL file {path} holds no PEM CRL (-----BEGIN X509 CRL-----)")


def inspection_context() -> ssl.SSLContext:
    """A context that accepts any certificate: only to read one and explain why it failed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


@dataclass(frozen=True, slots=True)
class Security:
    """Everything a protocol client needs to secure one connection."""

    context: ssl.SSLContext | None
    starttls: bool
    server_name: str
    fingerprints: tuple[str, ...] = ()
    verify: bool = True

    @property
    def implicit(self) -> bool:
        return self.context is not None and not self.starttls

    def check_peer(self, ssl_object: ssl.SSLObject | None, where: str) -> None:
        """Enforce the pins on the certificate just received; before any credential is sent."""
        if ssl_object is None or self.context is None:
            return
        der = ssl_object.getpeercert(binary_form=True)
        if self.fingerprints:
            if der is None:
                raise CertificateError(f"{where}: server presented no certificate to match the pin")
            prints = fingerprints(der)
            if not set(self.fingerprints) & set(prints.values()):
                shown = [colon_hex(prints["sha256"]), colon_hex(prints["md5"])]
                if "pin-sha256" in prints:
                    shown.append(prints["pin-sha256"])
                raise CertificateError(
                    f"{where}: fingerprint mismatch: server {self.server_name} has "
                    + ", ".join(shown)
                )
        elif not self.verify:
            log.warning(
                "%s: certificate of %s NOT verified (verify: false, no pin): the connection "
                "is encrypted but not authenticated",
                where,
                self.server_name,
            )
        if der is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("%s: certificate %s", where, colon_hex(fingerprints(der)["sha256"]))


def security_for(account: Account) -> Security:
    tls = account.tls
    return Security(
        context=context_for(tls),
        starttls=tls.mode == "starttls",
        server_name=server_name(account),
        fingerprints=tls.fingerprints,
        verify=tls.verify,
    )


def server_name(account: Account) -> str:
    """The name checked against the certificate and sent as SNI: never a resolved address.
    A fully qualified name's final dot is dropped, as certificates never carry it."""
    name = account.tls.server_name or account.host
    return name[:-1] if name.endswith(".") and len(name) > 1 else name


# -- certificates in plain words ------------------------------------------------------------


def fingerprints(der: bytes) -> dict[str, str]:
    """The certificate's fingerprints in the normalised forms config pins take.

    Keys md5, sha1, sha256 (of the whole certificate) and pin-sha256 (of its public key).
    """
    prints = {
        "md5": hashlib.md5(der, usedforsecurity=False).hexdigest().upper(),
        "sha1": hashlib.sha1(der, usedforsecurity=False).hexdigest().upper(),
        "sha256": hashlib.sha256(der).hexdigest().upper(),
    }
    result = {algo: f"{algo}:{digest}" for algo, digest in prints.items()}
    try:
        key = (
            x509.load_der_x509_certificate(der)
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        result["pin-sha256"] = (
            "pin-sha256:" + base64.b64encode(hashlib.sha256(key).digest()).decode()
        )
    except ValueError:
        pass
    return result


def colon_hex(pin: str) -> str:
    """``sha256:AABB..`` → ``SHA256:AA:BB:..`` as fetchmail and openssl print them."""
    algo, _, digits = pin.partition(":")
    return f"{algo.upper()}:" + ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    key: str
    self_signed: bool

    def valid_at(self, when: datetime) -> bool:
        return self.not_before <= when <= self.not_after


def describe_certificate(der: bytes) -> CertificateInfo:
    cert = x509.load_der_x509_certificate(der)
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    key = cert.public_key()
    size = getattr(key, "key_size", None)
    kind = type(key).__name__.removeprefix("_").replace("PublicKey", "")
    return CertificateInfo(
        subject=_name(cert.subject),
        issuer=_name(cert.issuer),
        names=tuple(names),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        key=f"{kind} {size} bits" if size else kind,
        self_signed=cert.subject == cert.issuer,
    )


def _name(name: x509.Name) -> str:
    cn = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    text = str(cn[0].value) if cn else name.rfc4514_string()
    return "".join(c if c.isprintable() else "?" for c in text)[:200] or "(empty)"


def explain_certificate_failure(
    der: bytes | None, name: str, verify_code: int | None, reason: str
) -> str:
    """Why the certificate of ``name`` was refused, with dates and names where they help."""
    if der is None:
        return f"certificate of {name} not trusted: {reason}"
    info = describe_certificate(der)
    now = datetime.now(UTC)
    if verify_code == 10 or now > info.not_after:
        return f"certificate for {name} expired on {info.not_after:%Y-%m-%d}"
    if verify_code == 9 or now < info.not_before:
        return (
            f"certificate for {name} is not valid before {info.not_before:%Y-%m-%d %H:%M} UTC "
            "(is this machine's clock right?)"
        )
    if verify_code in (62, 64) or (verify_code is None and "mismatch" in reason.lower()):
        listed = ", ".join(info.names) or f"CN={info.subject}"
        return f"certificate is for {listed}, not for {name}"
    if verify_code == 23:
        return (
            f"the certificate chain of {name} holds a revoked certificate (the server's own, "
            "or one of its issuers', by the configured CRLs)"
        )
    if verify_code in (18, 19) or info.self_signed:
        return f"certificate for {name} is self-signed ({info.subject}) and not trusted"
    if verify_code in (2, 20, 21):
        return f"certificate for {name} was issued by an unknown CA: {info.issuer}"
    if verify_code == 3:
        return f"no CRL available for the issuer of {name}'s certificate ({info.issuer})"
    return f"certificate of {name} not trusted: {reason}"


def describe_tls_error(exc: BaseException, name: str) -> str:
    """Plain words for a failed handshake, without the certificate at hand."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or "verification failed"
        if exc.verify_code in (62, 64):
            reason = f"it is not valid for {name}"
        return f"certificate of {name} not trusted: {reason}"
    reason = str(getattr(exc, "reason", None) or exc or type(exc).__name__)
    if "WRONG_VERSION_NUMBER" in reason.upper() or "HTTP_REQUEST" in reason.upper():
        return f"{name} did not answer in TLS (is this a plaintext port?) ({reason})"
    if "VERSION" in reason.upper() or "UNSUPPORTED_PROTOCOL" in reason.upper():
        return f"TLS handshake with {name} failed: no TLS version in common ({reason})"
    return f"TLS handshake with {name} failed: {reason}"


def translate_tls_error(exc: BaseException, name: str, where: str = "") -> Exception:
    """Certificate and version problems need a human; other handshake failures may pass."""
    prefix = f"{where}: " if where else ""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return CertificateError(prefix + describe_tls_error(exc, name), exc.verify_code)
    text = describe_tls_error(exc, name)
    if "no TLS version in common" in text:
        return PermanentError(prefix + text)
    return TemporaryError(prefix + text)


def describe_connect_error(e: OSError, security: Security | None) -> str:
    """Words for a failed connect; a reset during a TLS handshake usually means no common
    TLS version (or a client certificate the server wanted)."""
    if e.strerror:
        return e.strerror
    if isinstance(e, ConnectionResetError | ConnectionAbortedError) and security is not None:
        return (
            "connection closed during the TLS handshake (does the server support the "
            "configured TLS versions, and does it want a client certificate?)"
        )
    return str(e) or type(e).__name__


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
