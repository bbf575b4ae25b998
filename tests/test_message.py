from __future__ import annotations

import email.utils
import re
import time
from datetime import UTC, datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fetchd.deliver import (
    _PeriodStuffing,
    _quoted,
    _quoted_cached,
    _slow_normalize,
    _slow_period,
    _wire,
    normalize_line_endings,
)
from fetchd.message import DotFree, envelope_sender, has_8bit, header_section, received_header


@pytest.mark.parametrize(
    ("message", "sender"),
    [
        (b"Return-Path: <bounce@example.org>\r\nSubject: x\r\n\r\nbody", "bounce@example.org"),
        (b"Subject: x\nreturn-path:   <a@b.c>  \n\nbody", "a@b.c"),
        (b"Return-Path: <>\r\n\r\n", ""),
        (b"Return-Path: plain@example.org\r\n\r\n", "plain@example.org"),
        (b"Return-Path:\r\n <folded@example.org>\r\n\r\n", "folded@example.org"),
        (b"Subject: no return path\r\n\r\nReturn-Path: <in@body.example>\r\n", ""),
        (
            b"Return-Path: <first@x.example>\r\nReturn-Path: <second@x.example>\r\n\r\n",
            "first@x.example",
        ),
        (b"Return-Path: <has space@x.example>\r\n\r\n", ""),
        (b"Return-Path: <\xff@x.example>\r\n\r\n", ""),
        (b"Return-Path: <\xc3\xa9@x.example>\r\n\r\n", "\xe9@x.example"),
        (b"Return-Path: <a@b>\r\nInjected: <x>\r\n\r\n", "a@b"),
        (b"", ""),
    ],
)
def test_envelope_sender(message: bytes, sender: str) -> None:
    assert envelope_sender(message) == sender


@given(st.binary(max_size=300))
def test_envelope_sender_never_fails_and_is_safe_for_smtp(message: bytes) -> None:
    sender = envelope_sender(message)
    assert not any(c in sender for c in "\r\n\0 <>")


def test_header_section_stops_at_the_first_empty_line() -> None:
    assert header_section(b"A: 1\r\nB: 2\r\n\r\nC: 3\r\n") == b"A: 1\r\nB: 2\r\n"
    assert header_section(b"A: 1\nB: 2") == b"A: 1\nB: 2"


def test_has_8bit() -> None:
    assert has_8bit(b"caf\xc3\xa9")
    assert not has_8bit(b"plain ascii\r\n")


def test_received_header_is_a_single_folded_header_with_a_date() -> None:
    header = received_header(
        server="mail.example.net",
        server_ip="192.0.2.1",
        local_host="mx.local",
        protocol="IMAP",
        tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
        recipients=("alice@localhost",),
        message_id="INBOX/42; evil\r\nX-Injected: 1",
        account="alice",
        when=datetime(2026, 12, 3, 12, 0, tzinfo=UTC),
    )
    text = header.decode()
    assert text.startswith("Received: from mail.example.net (mail.example.net [192.0.2.1])\r\n")
    assert "with IMAP (TLSv1.3 TLS_AES_256_GCM_SHA384)" in text
    assert "for <alice@localhost>;" in text
    assert text.endswith("\tThu, 03 Dec 2026 12:00:00 +0000\r\n")
    lines = text.split("\r\n")[:-1]
    assert all(line.startswith("\t") for line in lines[1:]), "continuation lines are folded"
    assert "\r\nX-Injected" not in text, "server-provided text cannot add a header"


def test_received_header_dates_the_message_now() -> None:
    before = time.time()
    header = received_header(
        server="h",
        server_ip=None,
        local_host="l",
        protocol="POP3",
        tls="none",
        recipients=("a@b", "c@d"),
        message_id="1",
        account="x",
    )
    after = time.time()
    date = email.utils.parsedate_to_datetime(header.decode().rsplit("\t", 1)[1].strip())
    assert int(before) <= date.timestamp() <= after
    assert date.utcoffset() == datetime.now(UTC).astimezone().utcoffset(), "in local time"


@example([b"a", b"\r", b"b", b"\n", b"c", b"\r\n"])  # CR and LF alternate, not adjacent
@example([b"\r", b"\r\n", b"\n"])
@example([b"a", b"\r\n", b"\r"])
@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\x00", b"\xff", b" "])))
def test_fast_line_endings_and_dot_stuffing_give_the_same_bytes(parts: list[bytes]) -> None:
    message = b"".join(parts)
    assert normalize_line_endings(message) == _slow_normalize(message)
    assert _PeriodStuffing().sub(b"..", message) == _slow_period.sub(b"..", message)
    assert has_8bit(message) == (re.search(rb"[\x80-\xff]", message) is not None)


_PIECES = [b"a", b".", b"\r", b"\n", b"\r\n", b"\x00", b"\xff", b" ", b"X: y\r\n"]


@given(st.lists(st.sampled_from(_PIECES)), st.lists(st.sampled_from(_PIECES)))
def test_a_message_sent_in_parts_is_the_bytes_aiosmtplib_would_send_whole(
    head: list[bytes], parts: list[bytes]
) -> None:
    """The Received: header goes as its own part, and the body is not copied to join it."""
    prefix = b"".join(head)
    if prefix and not prefix.endswith(b"\r\n"):
        prefix += b"\r\n"
    body = b"".join(parts)
    whole = _slow_period.sub(b"..", _slow_normalize(prefix + body))
    assert b"".join(_wire([prefix, body] if prefix else [body])) == whole


def test_only_the_last_part_may_end_without_crlf() -> None:
    with pytest.raises(ValueError, match="must end with CRLF"):
        _wire([b"Received: x", b"body\r\n"])


def test_quoted_addresses_are_remembered_only_when_short() -> None:
    """A Return-Path of any length becomes the sender: only sane ones stay in the cache."""
    before = _quoted_cached.cache_info().currsize
    assert _quoted("x" * 400 + "@example.net") == "<" + "x" * 400 + "@example.net>"
    assert _quoted_cached.cache_info().currsize == before
    assert _quoted("alice@example.net") == "<alice@example.net>"
    assert _quoted_cached.cache_info().currsize == before + 1
    for _ in range(2):  # a refusal is not remembered as an answer
        with pytest.raises(ValueError):
            _quoted("a b@example.net")


def test_a_dot_free_body_is_not_searched_again_unless_normalising_changed_it() -> None:
    clean = DotFree(b"Subject: x\r\n\r\nno dots here\r\n")
    assert _wire([clean])[0] is clean, "neither copied nor searched"
    # A lone CR before a dot becomes a line start once CR becomes CRLF: stuffed all the same.
    assert _wire([DotFree(b"a\r.b\r\n")]) == [b"a\r\n..b\r\n"]
