"""``fetchd probe``: what a server presents, and what to put in the configuration.

Connects (implicit TLS, or after STLS/STARTTLS for POP3, IMAP or SMTP), reads the certificate
chain without trusting it, then checks it the way fetchd would, and prints the chain, the
fingerprints in every form a pin accepts, the negotiated version and cipher, the verdict with
its reason, and a tls: block ready to paste. Nothing is sent that could be a credential.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from fetchd.config import TLSSettings
from fetchd.errors import FetchdError, ProtocolError, TemporaryError
from fetchd.tls import (
    build_context,
    colon_hex,
    describe_certificate,
    describe_connect_error,
    explain_certificate_failure,
    fingerprints,
    inspection_context,
    tls_description,
)

STARTTLS_PORTS = {"pop3": 110, "imap": 143, "smtp": 25}
_ENCODING_DER = getattr(ssl, "_ssl").ENCODING_DER  # noqa: B009 - private: chain access


@dataclass
class ProbeResult:
    chain: list[bytes]
    negotiated: str
    verdict: str
    ok: bool


async def _starttls_dance(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: str
) -> None:
    """Ask for the upgrade in plaintext; raise unless the server agrees."""

    async def line() -> bytes:
        try:
            data = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            raise ProtocolError("server sent a line longer than 64 KiB before TLS") from None
        if not data:
            raise TemporaryError("server closed the connection before STARTTLS")
        return data

    greeting = await line()
    if protocol == "pop3":
        writer.write(b"STLS\r\n")
        reply = await line()
        ok = reply.startswith(b"+OK")
    elif protocol == "imap":
        if b"PREAUTH" in greeting.upper():
            raise ProtocolError("server greeted with PREAUTH: STARTTLS is impossible")
        writer.write(b"P1 STARTTLS\r\n")
        while not (reply := await line()).startswith(b"P1 "):
            pass
        ok = reply.upper().startswith(b"P1 OK")
    else:
        while greeting[3:4] == b"-":
            greeting = await line()
        writer.write(b"EHLO fetchd-probe\r\n")
        while (reply := await line())[3:4] == b"-":
            pass
        writer.write(b"STARTTLS\r\n")
        reply = await line()
        ok = reply.startswith(b"220")
    if not ok:
        text = reply.decode("ascii", "replace").strip()
        raise ProtocolError(f"server refused STARTTLS: {text[:200]}")


async def _handshake(
    host: str,
    port: int,
    starttls: str | None,
    ctx: ssl.SSLContext,
    name: str,
    deadline: float,
) -> ssl.SSLObject:
    async with asyncio.timeout(deadline):
        if starttls is None:
            _, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=name)
        else:
            reader, writer = await asyncio.open_connection(host, port)
            await _starttls_dance(reader, writer, starttls)
            await writer.start_tls(ctx, server_hostname=name)
    ssl_object: ssl.SSLObject = writer.get_extra_info("ssl_object")
    writer.close()
    return ssl_object


def _chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The chain as sent by the server (leaf first); only the leaf on Pythons that hide it."""
    inner = getattr(ssl_object, "_sslobj", None)
    getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        try:
            return [c.public_bytes(_ENCODING_DER) for c in getter() or []]
        except (AttributeError, ValueError):
            pass
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


async def probe(
    host: str,
    port: int,
    *,
    starttls: str | None,
    settings: TLSSettings,
    deadline: float = 20.0,
) -> ProbeResult:
    name = settings.server_name or host
    try:
        seen = await _handshake(host, port, starttls, inspection_context(), name, deadline)
    except ssl.SSLError as e:
        raise TemporaryError(f"TLS handshake with {host}:{port} failed: {e.reason or e}") from None
    except TimeoutError:
        raise TemporaryError(f"no TLS session with {host}:{port} within {deadline:g} s") from None
    except OSError as e:
        raise TemporaryError(
            f"cannot connect to {host}:{port}: {describe_connect_error(e, None)}"
        ) from None
    chain = _chain(seen)
    negotiated = tls_description(seen)
    try:
        verified = await _handshake(host, port, starttls, build_context(settings), name, deadline)
    except ssl.SSLCertVerificationError as e:
        reason = e.verify_message or str(e)
        verdict = explain_certificate_failure(
            chain[0] if chain else None, name, e.verify_code, reason
        )
        return ProbeResult(chain, negotiated, verdict, ok=False)
    except (ssl.SSLError, OSError, TimeoutError, FetchdError) as e:
        return ProbeResult(chain, negotiated, f"verification handshake failed: {e}", ok=False)
    if chain and verified.getpeercert(binary_form=True) != chain[0]:
        return ProbeResult(
            chain,
            negotiated,
            "the server presented a different certificate on the second connection: the "
            "verdict cannot be tied to the certificate shown (load balancer, or someone in "
            "the middle?)",
            ok=False,
        )
    trust = "the system's CAs" if settings.system_ca else ""
    if settings.ca_file:
        trust = f"{settings.ca_file}" + (f" and {trust}" if trust else "")
    return ProbeResult(
        chain, negotiated, f"trusted ({trust or 'configured CAs'}), valid for {name}", ok=True
    )


def report(
    host: str, port: int, starttls: str | None, result: ProbeResult, settings: TLSSettings
) -> str:
    how = f"STARTTLS {starttls}" if starttls else "implicit TLS"
    lines = [f"{host}:{port} ({how}): {result.negotiated}", ""]
    for i, der in enumerate(result.chain):
        info = describe_certificate(der)
        role = "server certificate" if i == 0 else f"chain certificate {i}"
        lines += [
            f"{role}:",
            f"  subject:  {info.subject}",
            f"  issuer:   {info.issuer}" + ("  (self-signed)" if info.self_signed else ""),
        ]
        if info.names:
            lines.append(f"  names:    {', '.join(info.names)}")
        lines += [
            f"  valid:    {info.not_before:%Y-%m-%d %H:%M} to {info.not_after:%Y-%m-%d %H:%M} UTC",
            f"  key:      {info.key}",
        ]
    if result.chain:
        prints = fingerprints(result.chain[0])
        lines += [
            "",
            "fingerprints of the server certificate:",
            f"  MD5     {colon_hex(prints['md5']).split(':', 1)[1]}   (fetchmail sslfingerprint)",
            f"  SHA1    {colon_hex(prints['sha1']).split(':', 1)[1]}",
            f"  SHA256  {colon_hex(prints['sha256']).split(':', 1)[1]}",
        ]
        if "pin-sha256" in prints:
            lines.append(f"  SPKI    {prints['pin-sha256']}   (survives renewal with the same key)")
    lines += ["", f"verdict: {'OK' if result.ok else 'NOT TRUSTED'}: {result.verdict}", ""]
    mode = "starttls" if starttls else "implicit"
    snippet = ["# paste under the account:", "tls:", f"  mode: {mode}"]
    if settings.ca_file:
        snippet.append(f"  ca_file: {settings.ca_file}")
    if settings.server_name:
        snippet.append(f"  server_name: {settings.server_name}")
    if result.chain and "pin-sha256" in fingerprints(result.chain[0]):
        pin = fingerprints(result.chain[0])["pin-sha256"]
        snippet.append(f'  fingerprints: ["{pin}"]   # optional: pin this key')
        if not result.ok:
            snippet.append("  # verify: false   # only if you trust the pin alone")
    lines += snippet
    return "\n".join(lines)


def default_port(starttls: str | None) -> int:
    return STARTTLS_PORTS[starttls] if starttls else 993
