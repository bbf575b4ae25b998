"""Prometheus metrics and a health check, served by a minimal HTTP listener.

Series, in the text exposition format 0.0.4:

- ``fetchd_messages_fetched_total{account}`` counter: messages downloaded
- ``fetchd_bytes_fetched_total{account}`` counter: bytes of those messages
- ``fetchd_messages_delivered_total{account}`` counter: messages the MTA accepted
- ``fetchd_messages_refused_total{account}`` counter: messages the MTA refused (5xx)
- ``fetchd_errors_total{account,kind}`` counter: failures by kind (temporary, permanent,
  config, internal)
- ``fetchd_polls_total{account,result}`` counter: polls by result (ok, failed)
- ``fetchd_last_success_timestamp_seconds{account}`` gauge: end of the last successful poll,
  0 until there is one, so "time() - x > limit" also catches an account that never worked
- ``fetchd_poll_duration_seconds{account}`` gauge: how long the last poll took
- ``fetchd_idle_connected{account,folder}`` gauge: 1 while an IDLE connection is up, else 0
- ``fetchd_accounts`` gauge: accounts configured
- ``fetchd_build_info{version}`` gauge: always 1, carries the version
- ``fetchd_up`` gauge: always 1

Counters of an account exist, at 0, from the first time it is mentioned: a series that
appears only with its first failure defeats rate() and alerts.

The listener answers GET and HEAD (the same without a body) on /metrics and /healthz, one
request per connection. It is meant for a scraper on a trusted network, yet a client that is
slow, silent or sends junk only costs a task for a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from http import HTTPStatus

log = logging.getLogger("fetchd.metrics")

ERROR_KINDS = ("temporary", "permanent", "config", "internal")
POLL_RESULTS = ("ok", "failed")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD = 8192  # bytes of request line and headers; a scraper sends a few hundred
TIMEOUT = 10.0  # seconds for a client to send its request, and again to take the answer
MAX_CLIENTS = 32  # at once; more are dropped
LINGER = 2.0  # seconds at most to wait for a client to close after the answer
LINGER_BYTES = 65536


@dataclass(frozen=True, slots=True)
class _Family:
    name: str
    kind: str
    help: str
    labels: tuple[str, ...]


_FETCHED = _Family("fetchd_messages_fetched_total", "counter", "Messages downloaded.", ("account",))
_BYTES = _Family(
    "fetchd_bytes_fetched_total", "counter", "Bytes of messages downloaded.", ("account",)
)
_DELIVERED = _Family(
    "fetchd_messages_delivered_total", "counter", "Messages the MTA accepted.", ("account",)
)
_REFUSED = _Family(
    "fetchd_messages_refused_total", "counter", "Messages the MTA refused (5xx).", ("account",)
)
_ERRORS = _Family("fetchd_errors_total", "counter", "Failures by kind.", ("account", "kind"))
_POLLS = _Family("fetchd_polls_total", "counter", "Polls by result.", ("account", "result"))
_LAST_SUCCESS = _Family(
    "fetchd_last_success_timestamp_seconds",
    "gauge",
    "Unix time the last successful poll ended, 0 before the first.",
    ("account",),
)
_DURATION = _Family(
    "fetchd_poll_duration_seconds", "gauge", "Duration of the last poll.", ("account",)
)
_IDLE = _Family(
    "fetchd_idle_connected", "gauge", "1 while the IDLE connection is up.", ("account", "folder")
)
_ACCOUNTS = _Family("fetchd_accounts", "gauge", "Accounts configured.", ())
_BUILD_INFO = _Family("fetchd_build_info", "gauge", "The running fetchd version.", ("version",))
_UP = _Family("fetchd_up", "gauge", "1 while fetchd runs.", ())

_FAMILIES = (
    _FETCHED,
    _BYTES,
    _DELIVERED,
    _REFUSED,
    _ERRORS,
    _POLLS,
    _LAST_SUCCESS,
    _DURATION,
    _IDLE,
    _ACCOUNTS,
    _BUILD_INFO,
    _UP,
)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class Metrics:
    """Per-account counters and gauges, rendered in the Prometheus text format 0.0.4."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._values: dict[_Family, dict[tuple[str, ...], float]] = {f: {} for f in _FAMILIES}
        self._accounts: set[str] = set()
        self._values[_ACCOUNTS][()] = 0
        self._values[_UP][()] = 1

    def register(self, account: str) -> None:
        """Create the account's series at 0, so they exist before anything happened."""
        if account in self._accounts:
            return
        self._accounts.add(account)
        for family in (_FETCHED, _BYTES, _DELIVERED, _REFUSED, _LAST_SUCCESS):
            self._values[family][(account,)] = 0
        for kind in ERROR_KINDS:
            self._values[_ERRORS][(account, kind)] = 0
        for result in POLL_RESULTS:
            self._values[_POLLS][(account, result)] = 0

    def _add(self, family: _Family, labels: tuple[str, ...], amount: float) -> None:
        self.register(labels[0])
        values = self._values[family]
        values[labels] = values.get(labels, 0) + amount

    def fetched(self, account: str, messages: int, nbytes: int) -> None:
        self._add(_FETCHED, (account,), messages)
        self._add(_BYTES, (account,), nbytes)

    def delivered(self, account: str, messages: int) -> None:
        self._add(_DELIVERED, (account,), messages)

    def refused(self, account: str, messages: int) -> None:
        """Messages the MTA refused permanently (5xx)."""
        self._add(_REFUSED, (account,), messages)

    def error(self, account: str, kind: str) -> None:
        """One failure; ``kind`` is one of ERROR_KINDS (others get a series of their own)."""
        self._add(_ERRORS, (account, kind), 1)

    def poll_finished(self, account: str, seconds: float, ok: bool) -> None:
        self._add(_POLLS, (account, "ok" if ok else "failed"), 1)
        self._values[_DURATION][(account,)] = seconds
        if ok:
            self._values[_LAST_SUCCESS][(account,)] = self._clock()

    def idle(self, account: str, folder: str, connected: bool) -> None:
        self.register(account)
        self._values[_IDLE][(account, folder)] = 1 if connected else 0

    def forget(self, account: str) -> None:
        """Drop every series of an account removed from the configuration."""
        self._accounts.discard(account)
        for family in _FAMILIES:
            if family.labels[:1] == ("account",):
                values = self._values[family]
                for labels in [k for k in values if k[0] == account]:
                    del values[labels]

    def set_info(self, accounts: int, version: str) -> None:
        self._values[_ACCOUNTS][()] = accounts
        self._values[_BUILD_INFO] = {(version,): 1}

    def render(self) -> str:
        lines: list[str] = []
        for family in _FAMILIES:
            lines.append(f"# HELP {family.name} {family.help}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for labels, value in sorted(self._values[family].items()):
                pairs = ",".join(
                    f'{name}="{_label_value(v)}"'
                    for name, v in zip(family.labels, labels, strict=True)
                )
                series = f"{family.name}{{{pairs}}}" if pairs else family.name
                lines.append(f"{series} {_number(value)}")
        return "\n".join(lines) + "\n"


class _Reject(Exception):
    """A request answered with an error status and no further processing."""

    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


@dataclass(slots=True)
class _Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    allow: bool = False
    head_only: bool = False

    def encode(self) -> bytes:
        head = [
            f"HTTP/1.1 {self.status.value} {self.status.phrase}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
        ]
        if self.allow:
            head.append("Allow: GET, HEAD")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("ascii")
        return data if self.head_only else data + self.body


def _error(status: HTTPStatus) -> _Response:
    return _Response(
        status, f"{status.phrase}\n".encode(), allow=status == HTTPStatus.METHOD_NOT_ALLOWED
    )


_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_FIELD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00\r\n]*")


async def _read_head(reader: asyncio.StreamReader) -> list[bytes] | None:
    """The request line and header lines, or None when the client sent nothing at all."""
    lines: list[bytes] = []
    size = 0
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # one line beyond the reader's limit
            raise _Reject(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE) from None
        size += len(line)
        if size > MAX_HEAD:
            raise _Reject(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        if not line.endswith(b"\n"):  # end of stream
            if size == 0:
                return None
            raise _Reject(HTTPStatus.BAD_REQUEST)
        line = line.removesuffix(b"\n").removesuffix(b"\r")
        if line:
            lines.append(line)
        elif lines:
            return lines
        # An empty line before the request line is tolerated (RFC 9112, section 2.2).


def _answer(
    lines: list[bytes], metrics: Metrics, health: Callable[[], tuple[bool, str]]
) -> _Response:
    parts = lines[0].split(b" ")
    if (
        len(parts) != 3
        or not _METHOD.fullmatch(parts[0])
        or not _TARGET.fullmatch(parts[1])
        or not _VERSION.fullmatch(parts[2])
        or not all(_FIELD.fullmatch(field) for field in lines[1:])
    ):
        return _error(HTTPStatus.BAD_REQUEST)
    method, target = parts[0], parts[1]
    path = target.split(b"?", 1)[0]
    if path not in (b"/metrics", b"/healthz"):
        return _error(HTTPStatus.NOT_FOUND)
    if method not in (b"GET", b"HEAD"):
        return _error(HTTPStatus.METHOD_NOT_ALLOWED)
    try:
        if path == b"/metrics":
            response = _Response(HTTPStatus.OK, metrics.render().encode(), CONTENT_TYPE)
        else:
            ok, reason = health()
            if ok:
                response = _Response(HTTPStatus.OK, b"ok\n")
            else:
                body = f"{reason}\n".encode()
                response = _Response(HTTPStatus.SERVICE_UNAVAILABLE, body)
    except Exception:
        log.exception("%s failed", path.decode("ascii"))
        return _error(HTTPStatus.INTERNAL_SERVER_ERROR)
    response.head_only = method == b"HEAD"
    return response


async def _linger(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float
) -> None:
    """Let the client close first, reading what it still sends.

    Closing a socket with unread input makes the kernel reset the connection, and the client
    may then lose the answer it was sent (an oversized request, for one).
    """
    if writer.can_write_eof():
        writer.write_eof()
    discarded = 0
    with suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while discarded < LINGER_BYTES:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                discarded += len(chunk)


async def _connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    metrics: Metrics,
    health: Callable[[], tuple[bool, str]],
    client_timeout: float,
) -> None:
    try:
        try:
            async with asyncio.timeout(client_timeout):
                lines = await _read_head(reader)
        except _Reject as e:
            response = _error(e.status)
        else:
            if lines is None:
                return
            response = _answer(lines, metrics, health)
        async with asyncio.timeout(client_timeout):
            writer.write(response.encode())
            await writer.drain()
        await _linger(reader, writer, min(client_timeout, LINGER))
    except Exception as e:  # a broken or stuck client must not reach the server
        log.debug("metrics client %s: %r", writer.get_extra_info("peername"), e)
        writer.transport.abort()
    finally:
        writer.close()
        try:  # a client that takes no data would hold the close until the buffer empties
            async with asyncio.timeout(client_timeout):
                await writer.wait_closed()
        except Exception:
            writer.transport.abort()


async def serve(
    metrics: Metrics,
    host: str,
    port: int,
    health: Callable[[], tuple[bool, str]],
    client_timeout: float = TIMEOUT,
) -> asyncio.Server:
    """Listen on host and port (0 picks a free one) for /metrics and /healthz.

    ``health`` says whether fetchd is healthy and, if not, why. ``client_timeout`` bounds how
    long a client may take to send its request and, separately, to take the answer.
    """

    clients = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal clients
        if clients >= MAX_CLIENTS:  # a flood must not take the file descriptors polls need
            writer.transport.abort()
            return
        clients += 1
        try:
            await _connection(reader, writer, metrics, health, client_timeout)
        finally:
            clients -= 1

    return await asyncio.start_server(handle, host, port, limit=MAX_HEAD, backlog=MAX_CLIENTS)
