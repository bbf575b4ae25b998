"""IMAP literals as fetchd's protocol reads them, without sockets: a UID FETCH response cut
into chunks at any points must give back every message's bytes exactly, whatever they hold."""

from __future__ import annotations

import asyncio

import aioimaplib
from hypothesis import given, settings
from hypothesis import strategies as st

from fetchd.imap import _Protocol

# Bodies that look like IMAP to a careless parser: parentheses, literals, FETCH lines.
_TRAPS = [b"(", b")", b"{5}\r\n", b"* 2 FETCH (UID 9 BODY[] {3}\r\n", b"\r\n", b"A1 OK done\r\n"]
bodies = st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(_TRAPS)), max_size=30).map(
    b"".join
)


def response(messages: list[bytes]) -> bytes:
    out = b""
    for n, body in enumerate(messages, start=1):
        out += b"* %d FETCH (UID %d BODY[] {%d}\r\n%s FLAGS (\\Seen))\r\n" % (n, n, len(body), body)
    return out + b"A1 OK fetched\r\n"


def parse(data: bytes, cuts: list[int]) -> aioimaplib.Response:
    async def run() -> aioimaplib.Response:
        loop = asyncio.get_running_loop()
        proto = _Protocol(loop)
        proto.state = aioimaplib.SELECTED
        command = aioimaplib.FetchCommand("A1", untagged_resp_name="FETCH", loop=loop)
        proto.pending_sync_command = command
        start = 0
        for cut in [*sorted(set(cuts)), len(data)]:
            if start < cut <= len(data):
                proto.data_received(data[start:cut])
                start = cut
        await asyncio.wait_for(command.wait(), 1)
        return command.response

    return asyncio.run(run())


@settings(max_examples=300, deadline=None)
@given(
    messages=st.lists(bodies, min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=1, max_value=2000), max_size=12),
)
def test_literals_survive_any_chunking(messages: list[bytes], cuts: list[int]) -> None:
    got = parse(response(messages), cuts)
    assert got.result == "OK"
    literals = [line for line in got.lines if isinstance(line, bytearray)]
    assert literals == messages
    tails = [got.lines[got.lines.index(lit) + 1] for lit in literals]
    assert all(t == b" FLAGS (\\Seen))" for t in tails), tails


def test_a_body_with_unbalanced_parentheses_ends_its_response() -> None:
    """The library counts parentheses in response lines only (``bytes``), so a literal must
    stay apart from them (a ``bytearray``), or a body with an open parenthesis would leave
    the response waiting for more."""
    body = b"Subject: (\r\n\r\n((( no closing\r\n"
    got = parse(response([body, b"second"]), [10, 40, 41, 70])
    assert got.result == "OK"
    assert [line for line in got.lines if isinstance(line, bytearray)] == [body, b"second"]


def test_an_empty_literal() -> None:
    got = parse(response([b"", b"x"]), [])
    assert [line for line in got.lines if isinstance(line, bytearray)] == [b"", b"x"]
