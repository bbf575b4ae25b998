"""An SMTP sink (aiosmtpd) that records what it accepted, for tests, the demo and benchmarks.

It runs inside the caller's event loop on a free loopback port (aiosmtpd's threaded
Controller cannot bind port 0). Replies can be scripted to show how fetchd handles refusals.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class Accepted:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...]
    tls: bool = False
    at: float = 0.0  # time.monotonic() when it was accepted


@dataclass
class Sink:
    accepted: list[Accepted] = field(default_factory=list)
    data_reply: str | None = None  # e.g. "451 4.3.0 try later" or "554 5.7.1 no"
    rcpt_reply: str | None = None
    # Per recipient: the RCPT reply (SMTP) or the reply after DATA (LMTP), e.g. "452 4.2.2 full".
    replies: dict[str, str] = field(default_factory=dict)
    lmtp: bool = False
    port: int = 0
    path: str = ""  # the Unix socket, when listening on one
    connections: int = 0
    delay: float = 0.0  # seconds before answering DATA, like a slow content filter
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, count: int) -> None:
        """Until at least `count` messages were accepted (bound it with asyncio.timeout)."""
        while len(self.accepted) < count:
            self._arrived.clear()
            await self._arrived.wait()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        if not self.lmtp and address in self.replies:
            return self.replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.data_reply:
            return self.data_reply
        if self.lmtp:  # one reply per recipient, in RCPT order (RFC 2033)
            lines = []
            for rcpt in envelope.rcpt_tos:
                reply = self.replies.get(rcpt, "250 2.0.0 delivered")
                if reply.startswith("2"):
                    self._accept(envelope, session, (rcpt,))
                lines.append(reply)
            return "\r\n".join(lines)
        self._accept(envelope, session, tuple(envelope.rcpt_tos))
        return "250 2.0.0 queued"

    def _accept(self, envelope: Envelope, session: Session, rcpts: tuple[str, ...]) -> None:
        self.accepted.append(
            Accepted(
                envelope.mail_from,
                rcpts,
                envelope.original_content,
                tuple(envelope.mail_options),
                session.ssl is not None,
                time.monotonic(),
            )
        )
        self._arrived.set()


class _SMTP(SMTP):  # type: ignore[misc]
    line_length_limit = 1 << 20  # like a real MTA, take long lines rather than fail them

    def connection_made(self, transport: Any) -> None:
        self.event_handler.connections += 1
        super().connection_made(transport)


class _LMTP(LMTP):  # type: ignore[misc]
    line_length_limit = 1 << 20

    def connection_made(self, transport: Any) -> None:
        self.event_handler.connections += 1
        super().connection_made(transport)


@asynccontextmanager
async def smtp_sink(
    *,
    tls_context: ssl.SSLContext | None = None,
    require_starttls: bool = False,
    unix_path: str | None = None,
    **kwargs: Any,
) -> AsyncIterator[Sink]:
    """A sink; with ``tls_context`` it offers STARTTLS (and insists on it if asked); with
    ``lmtp=True`` it speaks LMTP; with ``unix_path`` it listens on that Unix socket."""
    sink = Sink(**kwargs)
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        if sink.lmtp:
            return _LMTP(sink, hostname="mta.test", data_size_limit=None, enable_SMTPUTF8=True)
        return _SMTP(
            sink,
            hostname="mta.test",
            data_size_limit=None,
            enable_SMTPUTF8=True,
            tls_context=tls_context,
            require_starttls=require_starttls,
        )

    if unix_path:
        server = await loop.create_unix_server(factory, unix_path)
        sink.path = unix_path
    else:
        server = await loop.create_server(factory, "127.0.0.1", 0)
        sink.port = server.sockets[0].getsockname()[1]
    try:
        yield sink
    finally:
        server.close()
        await server.wait_closed()
