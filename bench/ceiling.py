"""The ceiling: a minimal download-only client, as fast as a Python asyncio client can be.

IMAPS: LOGIN, SELECT INBOX, one ``UID FETCH 1:* (BODY.PEEK[])``, LOGOUT. POP3S: USER/PASS,
STAT, every RETR sent at once (pipelined), QUIT. With ``"mode": "each"`` in the spec it waits
for each message before asking for the next (UID SEARCH, then one UID FETCH per message; one
RETR at a time), which shows what a round trip per message costs. Nothing is delivered or
deleted; the certificate is verified against the same CA as the other clients. Accounts run
concurrently, at most ``concurrency`` at a time. Prints one JSON object: messages, bytes,
accounts, errors.

Run: ``python -m bench.ceiling SPEC.json`` (written by the benchmark).
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import sys
from dataclasses import dataclass, field
from typing import Any

_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")
LIMIT = 64 << 20  # the StreamReader's buffer limit: a POP3 message is read in one piece


@dataclass
class Totals:
    messages: int = 0
    bytes: int = 0
    accounts: int = 0
    errors: list[str] = field(default_factory=list)


class Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.tag = 0

    async def line(self) -> bytes:
        data = await self.reader.readline()
        if not data:
            raise ConnectionError("connection closed")
        return data

    async def imap(self, command: str, totals: Totals | None = None) -> bytes:
        """Send one command; read untagged responses (counting literals) up to its tagged
        reply, which is returned."""
        self.tag += 1
        tag = f"a{self.tag}".encode()
        self.writer.write(tag + b" " + command.encode() + b"\r\n")
        while True:
            line = await self.line()
            while m := _LITERAL.search(line):  # a literal, then the rest of the line
                size = int(m.group(1))
                await self.reader.readexactly(size)
                if totals is not None:
                    totals.messages += 1
                    totals.bytes += size
                line = await self.line()
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(f"{command.split()[0]}: {line[:100]!r}")
                return line


async def _imap_account(
    spec: dict[str, Any], ctx: ssl.SSLContext, user: str, password: str, totals: Totals
) -> None:
    reader, writer = await asyncio.open_connection(
        spec["host"], spec["port"], ssl=ctx, server_hostname=spec["server_name"], limit=LIMIT
    )
    s = Session(reader, writer)
    try:
        await s.line()  # greeting
        await s.imap(f'LOGIN "{user}" "{password}"')
        await s.imap("SELECT INBOX")
        if spec.get("mode") == "each":
            found = Totals()
            s.tag += 1
            tag = f"a{s.tag}".encode()
            writer.write(tag + b" UID SEARCH ALL\r\n")
            uids: list[str] = []
            while True:
                line = await s.line()
                if line.startswith(b"* SEARCH"):
                    uids += line.decode().split()[2:]
                if line.startswith(tag + b" "):
                    break
            for uid in uids:
                await s.imap(f"UID FETCH {uid} (BODY.PEEK[])", found)
            totals.messages += found.messages
            totals.bytes += found.bytes
        else:
            await s.imap("UID FETCH 1:* (BODY.PEEK[])", totals)
        await s.imap("LOGOUT")
    finally:
        writer.close()


async def _pop3_account(
    spec: dict[str, Any], ctx: ssl.SSLContext, user: str, password: str, totals: Totals
) -> None:
    reader, writer = await asyncio.open_connection(
        spec["host"], spec["port"], ssl=ctx, server_hostname=spec["server_name"], limit=LIMIT
    )
    s = Session(reader, writer)

    async def ok() -> bytes:
        line = await s.line()
        if not line.startswith(b"+OK"):
            raise RuntimeError(f"POP3: {line[:100]!r}")
        return line

    try:
        await ok()
        writer.write(f"USER {user}\r\n".encode())
        await ok()
        writer.write(f"PASS {password}\r\n".encode())
        await ok()
        writer.write(b"STAT\r\n")
        count = int((await ok()).split()[1])
        each = spec.get("mode") == "each"
        if not each:
            writer.write(b"".join(b"RETR %d\r\n" % n for n in range(1, count + 1)))
        for n in range(1, count + 1):
            if each:
                writer.write(b"RETR %d\r\n" % n)
            # The status line and the message up to the terminating dot line in one read: the
            # status line's LF also ends an empty message's ".\r\n".
            data = await reader.readuntil(b"\n.\r\n")
            if not data.startswith(b"+OK"):
                raise RuntimeError(f"RETR: {data[:100]!r}")
            totals.messages += 1
            totals.bytes += len(data) - data.index(b"\n") - 1 - 3
        writer.write(b"QUIT\r\n")
        await ok()
    finally:
        writer.close()


async def run(spec: dict[str, Any]) -> Totals:
    ctx = ssl.create_default_context(cafile=spec["ca_file"])
    totals = Totals()
    gate = asyncio.Semaphore(spec.get("concurrency", 200))
    one = _pop3_account if spec["protocol"] == "pop3" else _imap_account

    async def account(user: str, password: str) -> None:
        async with gate:
            try:
                await one(spec, ctx, user, password, totals)
                totals.accounts += 1
            except (OSError, RuntimeError, asyncio.IncompleteReadError, ssl.SSLError) as e:
                totals.errors.append(f"{user}: {type(e).__name__}: {e}")

    await asyncio.gather(*(account(u, p) for u, p in spec["accounts"]))
    return totals


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        spec = json.load(f)
    totals = asyncio.run(run(spec))
    print(
        json.dumps(
            {
                "messages": totals.messages,
                "bytes": totals.bytes,
                "accounts": totals.accounts,
                "errors": totals.errors[:20],
            }
        )
    )
    return 0 if not totals.errors else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
