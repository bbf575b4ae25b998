"""A fast, counting SMTP sink for the benchmarks.

It answers 250 to everything (354 to DATA), keeps no message, and counts messages, bytes and
connections. It sets TCP_NODELAY on every connection, and by default TCP_QUICKACK after every
read ("acknowledge immediately"): a client that sends the final ``.\\r\\n`` as a small separate
segment without TCP_NODELAY (fetchmail does) would otherwise wait for the kernel's delayed ACK,
about 40 ms per message, and the benchmark would measure that timer instead of the client.
``quickack=False`` gives the behaviour of an ordinary listener.

With ``track=True`` it also records when each message carrying an ``X-Bench-Seq: N`` header
was accepted (for the IDLE latency scenario).
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

_SEQ = re.compile(rb"\nX-Bench-Seq: (\d+)\r?\n")
_HEAD = 16 * 1024  # how much of a message is kept to look for the X-Bench-Seq header
_EHLO = (
    b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
    b"250-SIZE 0\r\n250 ENHANCEDSTATUSCODES\r\n"
)


@dataclass
class SinkStats:
    messages: int = 0
    bytes: int = 0  # DATA bytes received, dot-stuffing and the final dot excluded
    connections: int = 0
    arrivals: dict[int, float] = field(default_factory=dict)  # X-Bench-Seq -> monotonic()
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self) -> None:
        self.messages = self.bytes = self.connections = 0
        self.arrivals.clear()

    async def wait_for(self, count: int) -> None:
        """Until at least ``count`` messages were accepted (bound it with a timeout)."""
        while self.messages < count:
            self.changed.clear()
            await self.changed.wait()


class _SinkProtocol(asyncio.Protocol):
    def __init__(self, stats: SinkStats, *, quickack: bool, track: bool) -> None:
        self.stats = stats
        self.quickack = quickack
        self.track = track
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.in_data = False
        self.msg_len = 0
        self.head = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.stats.connections += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
            self._ack_now()
        transport.write(b"220 sink.bench ESMTP\r\n")

    def _ack_now(self) -> None:
        if self.quickack and self.sock is not None:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:  # not every TCP stack has it; the sink still works
                self.quickack = False

    def data_received(self, data: bytes) -> None:
        self._ack_now()  # the kernel leaves quick-ACK mode by itself: re-arm after each read
        self.buf += data
        replies: list[bytes] = []
        close = False
        while True:
            if self.in_data:
                if not self._scan_data(replies):
                    break
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                if len(self.buf) > 1 << 20:
                    close = True
                break
            line = bytes(self.buf[:end])
            del self.buf[: end + 2]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"LHLO"):
                replies.append(_EHLO)
            elif verb == b"DATA":
                self.in_data, self.msg_len = True, 0
                self.head.clear()
                replies.append(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 2.0.0 bye\r\n")
                close = True
                break
            else:  # HELO, MAIL, RCPT, RSET, NOOP, anything: accepted
                replies.append(b"250 2.0.0 ok\r\n")
        if self.transport is not None:
            if replies:
                self.transport.write(b"".join(replies))
            if close:
                self.transport.close()

    def _scan_data(self, replies: list[bytes]) -> bool:
        """Consume message data; True when the message ended (and was counted)."""
        if self.msg_len == 0 and self.buf.startswith(b".\r\n"):  # an empty message
            del self.buf[:3]
            self._finish(replies)
            return True
        end = self.buf.find(b"\r\n.\r\n")
        if end < 0:
            keep = 4  # the terminator may straddle two reads
            if len(self.buf) > keep:
                self._take(len(self.buf) - keep)
            return False
        self._take(end + 2)
        del self.buf[:3]  # ".\r\n"
        self._finish(replies)
        return True

    def _take(self, n: int) -> None:
        if self.track and len(self.head) < _HEAD:
            self.head += self.buf[: min(n, _HEAD - len(self.head))]
        self.msg_len += n
        del self.buf[:n]

    def _finish(self, replies: list[bytes]) -> None:
        self.in_data = False
        stats = self.stats
        stats.messages += 1
        stats.bytes += self.msg_len
        if self.track:
            m = _SEQ.search(self.head)
            if m:
                stats.arrivals.setdefault(int(m.group(1)), time.monotonic())
        stats.changed.set()
        replies.append(b"250 2.0.0 queued\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.sock = None


class Sink:
    """Start with :meth:`start`, stop with :meth:`stop`; counts in :attr:`stats`."""

    def __init__(self, *, quickack: bool = True, track: bool = False) -> None:
        self.quickack = quickack
        self.track = track
        self.stats = SinkStats()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> _SinkProtocol:
            return _SinkProtocol(self.stats, quickack=self.quickack, track=self.track)

        self._server = await loop.create_server(factory, "127.0.0.1", 0, backlog=4096)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Sink:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
