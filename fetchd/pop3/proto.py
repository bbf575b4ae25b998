"""POP3 as a pure state machine: bytes in, replies out, no I/O.

Theory of operation (after h11): the caller turns a command into bytes with :meth:`send`, writes
them however it likes, feeds whatever the server sends to :meth:`receive_data`, and calls
:meth:`next_reply` until it returns a :class:`Reply` or ``NEED_DATA``. :meth:`send` remembers
which replies are multi-line (CAPA, LIST/UIDL without argument, RETR, TOP), so several commands
may be sent before any reply is read (RFC 2449 PIPELINING) and the replies still come out in
order.

Multi-line bodies are returned dot-unstuffed and byte-exact: CRLF stays CRLF, a bare LF stays a
bare LF, NUL and 8-bit bytes are untouched. Anything the server sends either parses or raises
:class:`~fetchd.errors.ProtocolError`; after that the connection is unusable.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass

from fetchd.errors import ProtocolError
from fetchd.message import DotFree

MULTILINE_COMMANDS = frozenset({"CAPA", "RETR", "TOP"})
MULTILINE_WITHOUT_ARGUMENT = frozenset({"LIST", "UIDL"})
_UNSAFE_ARGUMENT = re.compile(rb"[\x00\r\n]")
# The end of a multi-line reply: a line holding a single dot.
_UNSTUFF = re.compile(rb"^\.", re.MULTILINE)
_LINE_DOT = re.compile(rb"\n\.")  # a regex finds this two-byte needle faster than ``in``
_RESP_CODE = re.compile(rb"^\[([A-Za-z0-9/-]+)\]")


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Reply:
    """One server reply. ``body`` is the dot-unstuffed data of a multi-line reply."""

    ok: bool
    text: bytes
    body: bytes | None = None
    continuation: bool = False  # "+ challenge" during AUTH (RFC 5034): answer with send_sasl

    @property
    def code(self) -> str | None:
        """The RFC 2449 extended response code, e.g. ``IN-USE`` or ``SYS/TEMP``."""
        m = _RESP_CODE.match(self.text)
        return m.group(1).decode("ascii").upper() if m else None

    def lines(self) -> list[bytes]:
        """The body split into lines without their line ends."""
        if not self.body:
            return []
        return self.body.replace(b"\r\n", b"\n").rstrip(b"\n").split(b"\n")


class POP3Connection:
    """The client side of one POP3 session, from the greeting to QUIT."""

    def __init__(self, max_line: int = 1 << 20, max_body: int = 1 << 31) -> None:
        self.max_line = max_line
        self.max_body = max_body
        self._buffer = bytearray()
        self._scanned = 0  # how far the current multi-line body has been searched
        self._dotted = False  # a line of the current multi-line body starts with a dot
        # What each awaited reply is: "multi" when a +OK to it is followed by a body, "sasl"
        # when "+ " challenges may come before it, else "single".
        self._expect: deque[str] = deque(["single"])  # the greeting
        self._broken = False

    @property
    def pending(self) -> int:
        """How many replies are still awaited."""
        return len(self._expect)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed: must be 0 when STLS succeeds."""
        return len(self._buffer)

    def send(self, command: str, *args: str | bytes) -> bytes:
        """The bytes of one command; the caller writes them."""
        if self._broken:
            raise ProtocolError("the POP3 connection is broken")
        parts = [command.upper().encode("ascii")]
        for arg in args:
            raw = arg.encode("utf-8") if isinstance(arg, str) else arg
            if _UNSAFE_ARGUMENT.search(raw):
                raise ValueError(f"POP3 {command} argument contains CR, LF or NUL")
            parts.append(raw)
        name = command.upper()
        multiline = name in MULTILINE_COMMANDS or (name in MULTILINE_WITHOUT_ARGUMENT and not args)
        self._expect.append("multi" if multiline else "sasl" if name == "AUTH" else "single")
        return b" ".join(parts) + b"\r\n"

    def send_sasl(self, response: bytes) -> bytes:
        """The bytes of a SASL response line (base64, or ``*`` to cancel)."""
        if not self._expect or self._expect[0] != "sasl":
            raise ValueError("no SASL exchange in progress")
        if _UNSAFE_ARGUMENT.search(response):
            raise ValueError("SASL response contains CR, LF or NUL")
        return response + b"\r\n"

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_reply(self) -> Reply | NeedData:
        """The next complete reply, or NEED_DATA. Raises ProtocolError on malformed input."""
        if self._broken:
            raise ProtocolError("the POP3 connection is broken")
        try:
            return self._next_reply()
        except ProtocolError:
            self._broken = True
            raise

    def _next_reply(self) -> Reply | NeedData:
        if not self._expect:
            if self._buffer:
                raise ProtocolError(
                    f"server sent data nobody asked for: {bytes(self._buffer[:40])!r}"
                )
            return NEED_DATA
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > self.max_line:
                raise ProtocolError(f"status line longer than {self.max_line} bytes")
            return NEED_DATA
        line = bytes(self._buffer[:end]).rstrip(b"\r")
        if self._expect[0] == "sasl" and (line == b"+" or line.startswith(b"+ ")):
            del self._buffer[: end + 1]
            return Reply(True, line[2:], continuation=True)
        if line.startswith(b"+OK"):
            ok = True
            text = line[3:]
        elif line.startswith(b"-ERR"):
            ok = False
            text = line[4:]
        else:
            raise ProtocolError(f"not a POP3 status line: {line[:80]!r}")
        if text and text[:1] not in (b" ", b"\t"):
            raise ProtocolError(f"not a POP3 status line: {line[:80]!r}")
        text = text.strip()
        if ok and self._expect[0] == "multi":
            body = self._take_body(end + 1)
            if body is None:
                return NEED_DATA
            self._expect.popleft()
            return Reply(True, text, body)
        del self._buffer[: end + 1]
        self._expect.popleft()
        self._scanned = 0
        return Reply(ok, text)

    def _take_body(self, start: int) -> bytes | None:
        """Cut a complete multi-line body out of the buffer, or None if it has not all come.

        One pass finds both the terminator (a line holding a single dot) and whether any line
        starts with a dot: most bodies have none and need neither unstuffing nor, later, the
        delivery's own check for one (they come back as :class:`DotFree`).
        """
        buf = self._buffer
        # A line start is a newline plus one: the status line's own newline counts (a body
        # starting with a dot), and a "\n." may straddle two chunks, hence where to start.
        pos = max(start - 1, self._scanned - 4)
        while (m := _LINE_DOT.search(buf, pos)) is not None:
            i = m.start()
            after = buf[i + 2 : i + 4]
            if after[:1] == b"\n" or after == b"\r\n":  # the terminator
                # One copy, not two (a bytearray slice is one); the newline before the dot stays.
                with memoryview(buf) as view, view[start : i + 1] as raw:
                    body = bytes(raw) if self._dotted else DotFree(raw)
                del buf[: i + 2 + (1 if after[:1] == b"\n" else 2)]
                self._scanned = 0
                if self._dotted:
                    self._dotted = False
                    return _UNSTUFF.sub(b"", body)
                return body
            if after == b"" or after == b"\r":  # that line's end has not come yet
                self._scanned = i
                self._check_limits(start)
                return None
            self._dotted = True  # a stuffed line
            pos = i + 2
        self._scanned = len(buf)
        self._check_limits(start)
        return None

    def _check_limits(self, start: int) -> None:
        """A body still coming must stay within the size and line-length limits."""
        if len(self._buffer) - start > self.max_body:
            raise ProtocolError(f"message larger than the limit of {self.max_body} bytes")
        if len(self._buffer) - (self._buffer.rfind(b"\n") + 1) > self.max_line:
            raise ProtocolError(f"line longer than {self.max_line} bytes")
