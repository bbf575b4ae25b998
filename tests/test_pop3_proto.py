"""The sans-IO POP3 core, without sockets: every input parses or raises the one error."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fetchd.errors import ProtocolError
from fetchd.message import DotFree
from fetchd.pop3.proto import NEED_DATA, POP3Connection, Reply


def feed(conn: POP3Connection, data: bytes, *, chunk: int | None = None) -> list[Reply]:
    """Feed data whole or in chunks; collect every reply that completes."""
    replies: list[Reply] = []
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        conn.receive_data(piece)
        while (reply := conn.next_reply()) is not NEED_DATA:
            assert isinstance(reply, Reply)
            replies.append(reply)
    return replies


def session(*commands: tuple[str, ...]) -> POP3Connection:
    conn = POP3Connection()
    assert feed(conn, b"+OK ready\r\n") == [Reply(True, b"ready")]
    for command in commands:
        conn.send(*command)
    return conn


def stuff(body: bytes) -> bytes:
    """How a server puts a message on the wire (RFC 1939 §3)."""
    return re.sub(rb"(?m)^\.", b"..", body)


def test_status_lines_and_response_codes() -> None:
    conn = session(("USER", "alice"), ("PASS", "x"))
    replies = feed(conn, b"+OK\r\n-ERR [IN-USE] mailbox locked\r\n")
    assert replies[0] == Reply(True, b"")
    assert not replies[1].ok and replies[1].code == "IN-USE"
    assert replies[1].text == b"[IN-USE] mailbox locked"


def test_multiline_only_for_ok_replies_of_multiline_commands() -> None:
    conn = session(("RETR", "1"), ("LIST", "1"), ("LIST",), ("RETR", "2"))
    data = b"-ERR no such message\r\n+OK 1 20\r\n+OK\r\n1 20\r\n.\r\n+OK\r\nhi\r\n.\r\n"
    replies = feed(conn, data)
    assert [r.ok for r in replies] == [False, True, True, True]
    assert replies[1].body is None and replies[1].text == b"1 20"
    assert replies[2].lines() == [b"1 20"]
    assert replies[3].body == b"hi\r\n"


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7])
def test_body_is_unstuffed_and_byte_exact(chunk: int | None) -> None:
    body = b"A: b\r\n\r\n.leading dot\r\n.\r\nbare\nLF and NUL \x00 \xff\r\n..\r\n"
    conn = session(("RETR", "1"), ("DELE", "1"))
    replies = feed(conn, b"+OK\r\n" + stuff(body) + b".\r\n+OK deleted\r\n", chunk=chunk)
    assert replies == [Reply(True, b"", body), Reply(True, b"deleted")]


def test_empty_body_and_lf_only_server() -> None:
    conn = session(("RETR", "1"), ("RETR", "2"))
    assert feed(conn, b"+OK\r\n.\r\n+OK\nx\n.\n") == [
        Reply(True, b"", b""),
        Reply(True, b"", b"x\n"),
    ]


def test_garbage_status_line_is_a_protocol_error_and_final() -> None:
    conn = session(("STAT",))
    conn.receive_data(b"HELLO\r\n")
    with pytest.raises(ProtocolError):
        conn.next_reply()
    with pytest.raises(ProtocolError):
        conn.next_reply()
    with pytest.raises(ProtocolError):
        conn.send("QUIT")


def test_okay_is_not_ok() -> None:
    conn = session(("STAT",))
    conn.receive_data(b"+OKAY 1 2\r\n")
    with pytest.raises(ProtocolError):
        conn.next_reply()


def test_unsolicited_data_is_an_error() -> None:
    conn = session()
    conn.receive_data(b"+OK surprise\r\n")
    with pytest.raises(ProtocolError):
        conn.next_reply()


def test_overlong_status_line_is_refused_not_truncated() -> None:
    conn = POP3Connection(max_line=100)
    conn.receive_data(b"+OK " + b"x" * 200)
    with pytest.raises(ProtocolError, match="longer than 100"):
        conn.next_reply()


def test_overlong_body_line_and_message_limits() -> None:
    conn = POP3Connection(max_line=100)
    feed(conn, b"+OK\r\n")
    conn.send("RETR", "1")
    conn.receive_data(b"+OK\r\n" + b"y" * 150)
    with pytest.raises(ProtocolError, match="line longer"):
        conn.next_reply()
    conn = POP3Connection(max_body=1000)
    feed(conn, b"+OK\r\n")
    conn.send("RETR", "1")
    conn.receive_data(b"+OK\r\n" + b"line\r\n" * 200)
    with pytest.raises(ProtocolError, match="larger than"):
        conn.next_reply()


def test_command_injection_is_refused() -> None:
    conn = session()
    for bad in ("a\r\nDELE 1", "a\nb", "a\x00b"):
        with pytest.raises(ValueError):
            conn.send("USER", bad)
    assert conn.pending == 0


bodies = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=12,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@settings(max_examples=300, deadline=None)
@given(body=bodies, chunk=st.integers(min_value=1, max_value=50), trailing=st.binary(max_size=20))
def test_any_body_survives_the_wire_in_any_chunking(
    body: bytes, chunk: int, trailing: bytes
) -> None:
    """What a server stuffs comes out unstuffed, whole, byte by byte, or with data after it."""
    wire = b"+OK\r\n" + stuff(body) + b".\r\n"
    for size in (None, 1, chunk):
        conn = session(("RETR", "1"))
        assert feed(conn, wire, chunk=size) == [Reply(True, b"", body)]
    conn = session(("RETR", "1"), ("NOOP",))
    conn.receive_data(wire + b"+OK\r\n" + trailing)
    assert conn.next_reply() == Reply(True, b"", body)
    assert conn.next_reply() == Reply(True, b"")


dotty_bodies = st.lists(
    st.one_of(
        st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        st.sampled_from([b".", b"..", b".x", b"x.", b"\r."]),
    ),
    max_size=8,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@settings(max_examples=300, deadline=None)
@given(body=dotty_bodies, chunk=st.integers(min_value=1, max_value=7))
def test_a_body_is_marked_dot_free_exactly_when_no_line_starts_with_a_dot(
    body: bytes, chunk: int
) -> None:
    """Delivery skips its own dot check for a DotFree body: the mark must never be wrong."""
    wire = b"+OK\r\n" + stuff(body) + b".\r\n"
    for size in (None, 1, chunk):
        conn = session(("RETR", "1"))
        (reply,) = feed(conn, wire, chunk=size)
        assert reply.body == body
        dot_free = not body.startswith(b".") and b"\n." not in body
        assert (type(reply.body) is DotFree) == dot_free, reply.body


@settings(max_examples=500, deadline=None)
@given(
    data=st.binary(max_size=300),
    commands=st.lists(
        st.sampled_from(["RETR 1", "LIST", "LIST 1", "STAT", "CAPA", "UIDL"]), max_size=5
    ),
)
def test_any_bytes_parse_or_raise_protocol_error(data: bytes, commands: list[str]) -> None:
    for chunk in (None, 1):
        conn = POP3Connection(max_line=64, max_body=200)
        for c in commands:
            conn.send(*c.split())
        with contextlib.suppress(ProtocolError):
            feed(conn, data, chunk=chunk)
