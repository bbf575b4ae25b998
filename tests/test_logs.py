"""Log output: text, journald and JSON forms, and hostile text kept on one bounded line."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

import pytest

from fetchd.logs import MAX_MESSAGE, NOISY, setup_logging

log = logging.getLogger("fetchd.test")
TEXT_LINE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} (\w+) (.*)")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put back the root handlers (pytest's capture among them) and the levels changed."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)


def journal_env(stream: TextIO) -> dict[str, str]:
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def written(stream: TextIO) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().split("\n")[:-1]  # every record ends with a newline


def text_message(line: str) -> tuple[str, str]:
    match = TEXT_LINE.fullmatch(line)
    assert match, line
    return match[1], match[2]


@pytest.fixture
def logfile(tmp_path: Path) -> Iterator[TextIO]:
    with open(tmp_path / "log", "w+", encoding="utf-8") as f:
        yield f


def test_text_lines_have_time_level_and_message() -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, "text", out, environ={})
    log.info("alice: ok: %d delivered", 3)
    log.debug("not shown at INFO")
    log.warning("bob: slow")
    assert [text_message(line) for line in written(out)] == [
        ("INFO", "alice: ok: 3 delivered"),
        ("WARNING", "bob: slow"),
    ]


def test_auto_uses_priority_prefixes_when_the_stream_is_the_journal(logfile: TextIO) -> None:
    setup_logging(logging.DEBUG, "auto", logfile, environ=journal_env(logfile))
    log.debug("d")
    log.info("alice: ok: 3 delivered")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert written(logfile) == ["<7>d", "<6>alice: ok: 3 delivered", "<4>w", "<3>e", "<2>c"]


def test_auto_is_text_when_journal_stream_names_another_file(logfile: TextIO) -> None:
    st = os.fstat(logfile.fileno())
    setup_logging(
        logging.INFO, "auto", logfile, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}
    )
    log.info("alice: ok")
    [line] = written(logfile)
    assert text_message(line) == ("INFO", "alice: ok")


@pytest.mark.parametrize("value", ["", "garbage", "12:", ":34", "1:2:3"])
def test_auto_is_text_for_a_malformed_journal_stream(logfile: TextIO, value: str) -> None:
    setup_logging(logging.INFO, "auto", logfile, environ={"JOURNAL_STREAM": value})
    log.info("alice: ok")
    [line] = written(logfile)
    assert text_message(line) == ("INFO", "alice: ok")


def test_auto_is_text_for_a_stream_without_a_file_descriptor() -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, "auto", out, environ={"JOURNAL_STREAM": "1:2"})
    log.info("alice: ok")
    [line] = written(out)
    assert text_message(line) == ("INFO", "alice: ok")


def test_json_lines_parse_and_carry_the_fields() -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, "json", out, environ={})
    before = datetime.now(UTC)
    log.info("alice: ok: %d delivered", 3, extra={"account": "alice"})
    log.warning("plain")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("bob: internal error", extra={"account": "bob"})
    first, second, third = (json.loads(line) for line in written(out))

    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", first["ts"])
    ts = datetime.fromisoformat(first["ts"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= ts <= datetime.now(UTC)
    del first["ts"]
    assert first == {
        "level": "info",
        "logger": "fetchd.test",
        "msg": "alice: ok: 3 delivered",
        "account": "alice",
    }
    assert second["level"] == "warning" and second["msg"] == "plain"
    assert "account" not in second and "exc" not in second
    assert third["level"] == "error" and third["account"] == "bob"
    assert third["exc"].startswith("Traceback (most recent call last):")
    assert third["exc"].endswith("ValueError: boom")


def test_json_keeps_hostile_text_intact_but_on_one_safe_line() -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, "json", out, environ={})
    hostile = "ok\n2026-01-01 ERROR fake\x1b[31m\x9b\u2028\u2029\x7f"
    log.info("%s", hostile)
    [line] = written(out)
    assert line.isascii() and line.isprintable()
    assert json.loads(line)["msg"] == hostile


def test_long_message_is_cut_with_a_count() -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, "text", out, environ={})
    log.info("%s", "a" * (MAX_MESSAGE + 1234))
    [line] = written(out)
    _, message = text_message(line)
    assert message == "a" * MAX_MESSAGE + "\u2026 [1234 more characters]"


def test_a_message_of_exactly_the_limit_is_kept_whole() -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, "text", out, environ={})
    log.info("%s", "a" * MAX_MESSAGE)
    [line] = written(out)
    assert text_message(line) == ("INFO", "a" * MAX_MESSAGE)


def test_cut_never_splits_an_escape() -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, "text", out, environ={})
    log.info("%s", "x" + "\x1b" * MAX_MESSAGE)
    [line] = written(out)
    _, message = text_message(line)
    # "x" and 1023 escapes of four characters fill 4093; the next escape would not fit.
    assert message == "x" + "\\x1b" * 1023 + f"\u2026 [{MAX_MESSAGE - 1023} more characters]"


def test_json_message_is_cut_too() -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, "json", out, environ={})
    log.info("%s", "b" * (MAX_MESSAGE + 10))
    [line] = written(out)
    assert json.loads(line)["msg"] == "b" * MAX_MESSAGE + "\u2026 [10 more characters]"


def test_control_characters_are_escaped() -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, "text", out, environ={})
    log.info("server said: %s", "\x1b[31mred\r\n\x00\t\x7f\x85\x9b\u2028\u2029 caf\u00e9")
    [line] = written(out)
    _, message = text_message(line)
    assert message == (
        "server said: \\x1b[31mred\\x0d\\n\\x00\\x09\\x7f\\x85\\x9b\\u2028\\u2029 caf\u00e9"
    )


def test_a_forged_line_stays_on_the_real_one() -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, "text", out, environ={})
    log.info("alice: server greeting: %s", "ok\n2026-01-01 ERROR fake")
    out.seek(0)
    raw = out.read()
    assert len(raw.splitlines()) == 1
    assert text_message(raw.rstrip("\n")) == (
        "INFO",
        "alice: server greeting: ok\\n2026-01-01 ERROR fake",
    )


def test_traceback_lines_carry_the_priority_in_the_journal(logfile: TextIO) -> None:
    setup_logging(logging.INFO, "auto", logfile, environ=journal_env(logfile))
    try:
        raise RuntimeError("bad\x1b[2Jreply\nsecond line")
    except RuntimeError:
        log.exception("alice: internal error")
    lines = written(logfile)
    assert lines[0] == "<3>alice: internal error"
    assert lines[1] == "<3>Traceback (most recent call last):"
    assert all(line.startswith("<3>") for line in lines)
    assert any(line.startswith("<3>  File ") for line in lines)
    # The exception text spans two lines; each is a journal line of its own, and escaped.
    assert lines[-2:] == ["<3>RuntimeError: bad\\x1b[2Jreply", "<3>second line"]


def test_traceback_follows_a_text_line_escaped() -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, "text", out, environ={})
    try:
        raise RuntimeError("bad\x1b[2Jreply")
    except RuntimeError:
        log.warning("alice: failed", exc_info=True)
    lines = written(out)
    assert text_message(lines[0]) == ("WARNING", "alice: failed")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: bad\\x1b[2Jreply"


def test_calling_twice_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(logging.INFO, "text", first, environ={})
    setup_logging(logging.INFO, "text", second, environ={})
    log.info("once")
    assert written(first) == []
    assert [text_message(line) for line in written(second)] == [("INFO", "once")]
    assert len(logging.getLogger().handlers) == 1


def test_levels_of_root_and_noisy_libraries() -> None:
    setup_logging(logging.DEBUG, "text", io.StringIO(), environ={})
    assert logging.getLogger().level == logging.DEBUG
    assert all(logging.getLogger(name).level == logging.WARNING for name in NOISY)
    setup_logging(logging.ERROR, "text", io.StringIO(), environ={})
    assert logging.getLogger().level == logging.ERROR
    assert all(logging.getLogger(name).level == logging.ERROR for name in NOISY)


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        setup_logging(logging.INFO, "xml", io.StringIO(), environ={})
