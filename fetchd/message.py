"""What fetchd reads from and adds to a message: pure functions over bytes.

Messages are never parsed into objects and re-serialised: headers are not decoded, re-folded
or re-encoded. fetchd only looks for the envelope sender and prepends one trace header.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime

from fetchd import __version__
from fetchd.config import Delivery

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_RETURN_PATH = re.compile(rb"(?im)^Return-Path:[ \t]*((?:.*)(?:\r?\n[ \t].*)*)")
_ANGLE = re.compile(rb"<([^<>]*)>")
_ADDRESS = re.compile(
    r"^[^\x00-\x20\x7f-\x9f<>()\[\],;:\\\"@]+(@[^\x00-\x20\x7f-\x9f<>()\[\],;\\\"@]+)?$"
)
_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9._@+\-]")


class DotFree(bytes):
    """Message bytes in which no line starts with a dot, as a reader that already looked at
    every line start (POP3's unstuffing) found them: delivery need not look again."""


def header_section(message: bytes) -> bytes:
    """The header part: everything before the first empty line (all of it if there is none)."""
    m = _HEADER_END.search(message)
    if not m:
        return message
    return message[: m.start() + (2 if message[m.start()] == 0x0D else 1)]


def message_digest(message: bytes) -> str:
    """Message-ID plus a hash of the body: the same message even when a server rewrote or
    added headers (a Received: line, a spam score) on the way."""
    m = _HEADER_END.search(message)
    body = message[m.end() :] if m else b""
    ids = header_values(message, "Message-ID")
    h = hashlib.sha256(ids[0] if ids else b"")
    h.update(b"\0")
    h.update(body.replace(b"\r\n", b"\n"))
    return h.hexdigest()[:32]


def envelope_sender(message: bytes) -> str:
    """The sender for MAIL FROM: the first Return-Path, or "" (the null sender).

    A missing, empty (``<>``) or unusable Return-Path gives the null sender, which an MTA
    always accepts and which never causes a bounce to a forged address.
    """
    m = _RETURN_PATH.search(header_section(message))
    if not m:
        return ""
    value = re.sub(rb"\r?\n[ \t]", b" ", m.group(1)).strip()
    angle = _ANGLE.search(value)
    raw = angle.group(1) if angle else value
    try:
        address = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return ""
    if not _ADDRESS.match(address) or not address.isprintable():
        return ""
    return address


def header_values(message: bytes, name: str) -> list[bytes]:
    """Every value of a header in the header section, unfolded, in order."""
    pattern = re.compile(
        rb"(?im)^" + re.escape(name.encode()) + rb":[ \t]*((?:.*)(?:\r?\n[ \t].*)*)"
    )
    return [
        re.sub(rb"\r?\n[ \t]", b" ", m.group(1)).strip()
        for m in pattern.finditer(header_section(message))
    ]


def recipients_for(message: bytes, delivery: Delivery) -> tuple[str, ...]:
    """The envelope recipients: from the configuration, or for multidrop from the envelope
    header the receiving server added, kept only for local domains and mapped by the table.

    Multidrop never guesses from To/Cc. No usable address gives the fallback, then ``to``.
    """
    drop = delivery.multidrop
    if drop is None:
        return delivery.to
    table = dict(drop.map)
    found: list[str] = []
    for value in header_values(message, drop.header):
        angle = _ANGLE.search(value)
        raw = (angle.group(1) if angle else value).strip()
        try:
            address = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        local, at, domain = address.rpartition("@")
        if not at or not local or domain.lower() not in drop.local_domains:
            continue
        if not _ADDRESS.match(address) or not address.isprintable():
            continue
        mapped = table.get(address.lower()) or table.get(local.lower()) or address
        if mapped not in found:
            found.append(mapped)
    if found:
        return tuple(found)
    if drop.fallback:
        return (drop.fallback,)
    return delivery.to


def has_8bit(message: bytes) -> bool:
    return not message.isascii()


@functools.lru_cache(maxsize=2)
def _date_now(second: int) -> str:
    """The date of a trace header, made once a second: formatting it was 1-2 % of the CPU
    of a busy poll."""
    return format_datetime(datetime.fromtimestamp(second, UTC).astimezone())


def received_header(
    *,
    server: str,
    server_ip: str | None,
    local_host: str,
    protocol: str,
    tls: str,
    recipients: tuple[str, ...],
    message_id: str,
    account: str,
    when: datetime | None = None,
) -> bytes:
    """An RFC 5321-style trace header saying where fetchd got the message, and how."""
    date = format_datetime(when) if when else _date_now(int(time.time()))
    peer = f"{server} ({server} [{server_ip}])" if server_ip else server
    rcpt = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    ident = _TOKEN_UNSAFE.sub("_", message_id)[:80] or "unknown"
    return (
        f"Received: from {peer}\r\n"
        f"\tby {local_host} (fetchd {__version__}, account {_TOKEN_UNSAFE.sub('_', account)})"
        f"\r\n\twith {protocol} ({tls}) id {ident}{rcpt};\r\n"
        f"\t{date}\r\n"
    ).encode()
