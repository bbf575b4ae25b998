"""Synthetic mail with a realistic size distribution, or the project's test corpus.

Sizes are drawn (log-uniform within each class) from:

=========  ===============  ======================================
share      size             kind
=========  ===============  ======================================
60 %       1.5 - 10 KB      plain text
28 %       10 - 60 KB       HTML newsletter (multipart/alternative)
10 %       60 - 600 KB      text with an attachment
2 %        0.6 - 5 MB       text with a large attachment
=========  ===============  ======================================

In theory that is a median near 7 KB and a mean near 75 KB, about what surveys of real
mailboxes report; the 400-body pool of seed 1 comes out at a median of about 9 KB and a mean of
about 90 KB as served. Bodies come from that pool (generated once per seed) and every message
gets its own headers, so messages are distinct but generating thousands of them stays cheap.
Everything is LF-terminated, as it is stored in a Maildir; servers serve it with CRLF.
"""

from __future__ import annotations

import base64
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLASSES: tuple[tuple[float, int, int, str], ...] = (
    (0.60, 1_500, 10_000, "text"),
    (0.28, 10_000, 60_000, "html"),
    (0.10, 60_000, 600_000, "attachment"),
    (0.02, 600_000, 5_000_000, "attachment"),
)
_WORD_TEXT = """
the of and to in is that for it as was with be by on not he this are or his from at which but
have an they you were her all she there would their we him been has when who will more no if
out so said what up its about into than them can only other new some could time these two may
then do first any my now such like our over man me even most made after also did many before
must through back years where much your way well down should because each just those people how
too little state good very make world still own see men work long get here between both life
being under never day same another know while last might us great old year off come since
against go came right used take three meeting invoice report quarterly budget project deadline
schedule review attached please regards thanks update server release customer order shipment
account password
"""
WORDS = _WORD_TEXT.split()


@dataclass(frozen=True, slots=True)
class Message:
    data: bytes  # LF line ends, as stored in the Maildir

    @property
    def served_size(self) -> int:
        """Its size as a POP3/IMAP server sends it (CRLF line ends)."""
        return len(self.data) + self.data.count(b"\n")


def _words(rng: random.Random, nbytes: int, width: int = 72) -> list[str]:
    lines: list[str] = []
    total = 0
    while total < nbytes:
        line: list[str] = []
        length = 0
        while length < width:
            w = rng.choice(WORDS)
            line.append(w)
            length += len(w) + 1
        text = " ".join(line)
        lines.append(text)
        total += len(text) + 1
        if rng.random() < 0.12:
            lines.append("")
            total += 1
    return lines


def _text_body(rng: random.Random, size: int) -> str:
    return "Content-Type: text/plain; charset=us-ascii\n\n" + "\n".join(_words(rng, size)) + "\n"


def _html_body(rng: random.Random, size: int) -> str:
    boundary = f"=_alt_{rng.getrandbits(64):016x}"
    plain = "\n".join(_words(rng, size // 4))
    html: list[str] = ['<html><body><table width="100%">']
    total = 0
    while total < size * 3 // 4:
        row = (
            '<tr><td style="font-family:Arial,sans-serif;font-size:14px;color:#333333;">'
            + " ".join(rng.choice(WORDS) for _ in range(12))
            + "</td></tr>"
        )
        html.append(row)
        total += len(row) + 1
    html.append("</table></body></html>")
    return (
        f'Content-Type: multipart/alternative; boundary="{boundary}"\n\n'
        f"--{boundary}\nContent-Type: text/plain; charset=us-ascii\n\n{plain}\n"
        f"--{boundary}\nContent-Type: text/html; charset=us-ascii\n\n" + "\n".join(html) + "\n"
        f"--{boundary}--\n"
    )


def _attachment_body(rng: random.Random, size: int) -> str:
    boundary = f"=_mix_{rng.getrandbits(64):016x}"
    text = "\n".join(_words(rng, min(2_000, size // 10)))
    raw = rng.randbytes(max(1, (size - len(text)) * 3 // 4 * 76 // 77))
    b64 = base64.encodebytes(raw).decode("ascii")  # 76-character lines
    name = f"{rng.choice(WORDS)}-{rng.randrange(1000)}.pdf"
    return (
        f'Content-Type: multipart/mixed; boundary="{boundary}"\n\n'
        f"--{boundary}\nContent-Type: text/plain; charset=us-ascii\n\n{text}\n"
        f'--{boundary}\nContent-Type: application/pdf; name="{name}"\n'
        f'Content-Transfer-Encoding: base64\nContent-Disposition: attachment; filename="{name}"'
        f"\n\n{b64}--{boundary}--\n"
    )


def _draw_size(rng: random.Random) -> tuple[int, str]:
    r = rng.random()
    for share, low, high, kind in CLASSES:
        if r < share:
            return int(math.exp(rng.uniform(math.log(low), math.log(high)))), kind
        r -= share
    return CLASSES[-1][1], CLASSES[-1][3]


def body(rng: random.Random, size: int, kind: str) -> str:
    if kind == "text":
        return _text_body(rng, size)
    if kind == "html":
        return _html_body(rng, size)
    return _attachment_body(rng, size)


class MailFactory:
    """Makes the messages of account ``a`` (0-based) and message ``m``, deterministically."""

    def __init__(self, seed: int = 1, pool: int = 400, corpus: Path | None = None) -> None:
        rng = random.Random(seed)
        self.seed = seed
        self._corpus: list[bytes] = []
        self._bodies: list[str] = []
        if corpus is not None:
            self._corpus = [
                p.read_bytes().replace(b"\r\n", b"\n") for p in sorted(corpus.glob("*.eml"))
            ]
            if not self._corpus:
                raise ValueError(f"no *.eml files in {corpus}")
        else:
            for _ in range(pool):
                size, kind = _draw_size(rng)
                self._bodies.append(body(rng, size, kind))

    def message(self, account: int, number: int, seq: int | None = None) -> Message:
        pick = (account * 7919 + number * 104_729 + self.seed) % max(
            1, len(self._corpus) or len(self._bodies)
        )
        tag = f"X-Bench-Seq: {seq}\n" if seq is not None else ""
        if self._corpus:
            data = self._corpus[pick]
            return Message(f"X-Bench-Id: {account}.{number}\n{tag}".encode() + data)
        day = 1 + (account + number) % 28
        mx = number % 5
        date = f"Tue, {day:02d} Oct 2025 10:{number % 60:02d}:00 +0000"
        headers = (
            f"Return-Path: <sender{number % 97}@example.org>\n"
            f"Received: from mx{mx}.example.org (mx{mx}.example.org [192.0.2.{number % 250 + 1}])\n"
            f"\tby mail.example.net with ESMTPS id {account:06d}{number:06d}\n"
            f"\tfor <user{account}@example.net>; {date}\n"
            f"From: Sender {number % 97} <sender{number % 97}@example.org>\n"
            f"To: User {account} <user{account}@example.net>\n"
            f"Subject: Bench message {number} for account {account}\n"
            f"Date: {date}\n"
            f"Message-ID: <bench.{account}.{number}.{seq or 0}@example.org>\n"
            f"X-Bench-Id: {account}.{number}\n{tag}"
            "MIME-Version: 1.0\n"
        )
        return Message((headers + self._bodies[pick]).encode("ascii"))

    def big(self, size: int) -> Message:
        """One message of about ``size`` bytes (as served), mostly a base64 attachment."""
        rng = random.Random(self.seed + size)
        headers = (
            "From: Big Sender <big@example.org>\nTo: User 0 <user0@example.net>\n"
            "Subject: a large attachment\nDate: Tue, 07 Oct 2025 10:00:00 +0000\n"
            "Message-ID: <bench.big@example.org>\nX-Bench-Id: 0.0\nMIME-Version: 1.0\n"
        )
        # base64 lines of 77 bytes as stored become 78 as served
        data = (headers + _attachment_body(rng, size * 77 // 78)).encode("ascii")
        return Message(data)


def total_served(messages: Sequence[Message]) -> int:
    return sum(m.served_size for m in messages)
