"""Logging setup: plain lines for a terminal, priority-prefixed lines for journald, or JSON.

Log messages carry text that servers chose: greetings, error replies, certificate subjects.
Every message is escaped and bounded here, in one place, so such text cannot forge a log line,
smuggle a terminal escape sequence or flood the journal, whatever the call site passed.

Under systemd, stderr usually goes to the journal, which adds its own timestamp and reads a
``<N>`` prefix as the line's priority (sd-daemon(3)); ``auto`` uses that form exactly when
JOURNAL_STREAM names the stream's device and inode, as systemd.exec(5) documents.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

MAX_MESSAGE = 4096  # characters of a message (or traceback line) kept; the rest is only counted
MAX_DETAIL = 16 * MAX_MESSAGE  # characters of a traceback kept: its top says where it started
FORMATS = ("auto", "text", "json")
NOISY = ("aioimaplib", "aioimaplib.aioimaplib", "aiosmtplib", "asyncio", "httpx", "httpcore")

_JOURNAL_STREAM = re.compile(r"(\d+):(\d+)", re.ASCII)
# json.dumps escapes C0 itself; these would still break a line or reach a terminal raw.
_JSON_UNSAFE = re.compile(r"[\x7f-\x9f\u2028\u2029]")


def _unsafe(code: int) -> bool:
    """C0, DEL, C1 and the Unicode line and paragraph separators: all end or alter a line."""
    return code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029)


def _escape(char: str) -> str:
    code = ord(char)
    if char == "\n":
        return "\\n"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _more(count: int) -> str:
    return f"\u2026 [{count} more characters]"


def sanitize(text: str, limit: int = MAX_MESSAGE) -> str:
    """Escape control characters and keep at most ``limit`` characters of the result.

    An escape is never split, and the marker counts the original characters left out.
    """
    if len(text) <= limit and not any(_unsafe(ord(c)) for c in text):
        return text
    out: list[str] = []
    used = 0
    for index, char in enumerate(text):
        piece = _escape(char) if _unsafe(ord(char)) else char
        if used + len(piece) > limit:
            return "".join(out) + _more(len(text) - index)
        out.append(piece)
        used += len(piece)
    return "".join(out)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + _more(len(text) - limit)


def _priority(levelno: int) -> int:
    """The syslog priority journald should file a record under."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def _journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether the stream is the journal connection systemd gave this process.

    Comparing device and inode keeps a redirected stderr (a file, a pipe into another program)
    in text form even though the variable was inherited.
    """
    match = _JOURNAL_STREAM.fullmatch(environ.get("JOURNAL_STREAM", ""))
    if match is None:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor behind the stream
        return False
    return (st.st_dev, st.st_ino) == (int(match[1]), int(match[2]))


class _LineFormatter(logging.Formatter):
    """One line per record, followed by the traceback lines, each escaped and bounded."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = sanitize(record.getMessage())
        if self.journal:
            # Every line gets the prefix: journald files each line on its own.
            prefix = f"<{_priority(record.levelno)}>"
            lines = [prefix + message]
        else:
            prefix = ""
            lines = [f"{self.formatTime(record)} {record.levelname} {message}"]
        lines.extend(prefix + sanitize(line) for line in _details(self, record))
        return "\n".join(lines)


def _details(formatter: logging.Formatter, record: logging.LogRecord) -> list[str]:
    """The traceback and stack lines of a record, each text cut to MAX_DETAIL characters."""
    texts = []
    if record.exc_info:
        texts.append(formatter.formatException(record.exc_info))
    if record.stack_info:
        texts.append(formatter.formatStack(record.stack_info))
    return [line for text in texts for line in _cut(text, MAX_DETAIL).split("\n")]


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors that parse fields instead of text."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _cut(record.getMessage(), MAX_MESSAGE),
        }
        account = record.__dict__.get("account")
        if account is not None:
            entry["account"] = _cut(str(account), MAX_MESSAGE)
        if record.exc_info:
            entry["exc"] = _cut(self.formatException(record.exc_info), MAX_DETAIL)
        if record.stack_info:
            entry["stack"] = _cut(self.formatStack(record.stack_info), MAX_DETAIL)
        line = json.dumps(entry, ensure_ascii=False)
        return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m[0]):04x}", line)


def setup_logging(
    level: int,
    fmt: str = "auto",
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Send all log records to ``stream`` (stderr) in the chosen format, replacing any earlier
    setup, so that calling it again (on reload, in tests) never duplicates lines.

    ``fmt`` is "text", "json" or "auto": text, or the journald form when stderr is the journal.
    The chattiest libraries stay at WARNING or above even when ``level`` is DEBUG.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}, expected one of {', '.join(FORMATS)}")
    out = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ
    formatter: logging.Formatter
    if fmt == "json":
        formatter = _JsonFormatter()
    else:
        formatter = _LineFormatter(journal=fmt == "auto" and _journal(out, env))
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    sys.unraisablehook = _unraisable


def _unraisable(unraisable: Any) -> None:
    """Errors Python cannot raise (in __del__, say) go through the log, in its format, not as
    raw traceback lines on stderr."""
    logging.getLogger("fetchd").warning(
        "ignored error in %r: %s",
        unraisable.object,
        unraisable.exc_value,
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
    )
