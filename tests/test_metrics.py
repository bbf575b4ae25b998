"""Metrics: the exposition text, and the HTTP listener facing real and misbehaving clients."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass

import pytest

from fetchd.metrics import CONTENT_TYPE, MAX_CLIENTS, MAX_HEAD, Metrics, serve

NOW = 1_764_778_837.25
SAMPLE = re.compile(
    r'([a-z_]+)(\{([a-z_]+="([^"\\\n]|\\[\\"n])*",?)*\})? (-?[0-9.e+]+|[+-]Inf|NaN)'
)


def busy_metrics() -> Metrics:
    metrics = Metrics(clock=lambda: NOW)
    metrics.set_info(accounts=2, version="0.1.0")
    metrics.fetched("alice", 3, 1200)
    metrics.fetched("alice", 1, 34)
    metrics.delivered("alice", 3)
    metrics.refused("alice", 1)
    metrics.error("alice", "temporary")
    metrics.error("alice", "temporary")
    metrics.poll_finished("alice", 1.5, ok=True)
    metrics.poll_finished("alice", 0.25, ok=False)
    metrics.idle("alice", "INBOX", connected=True)
    metrics.idle("alice", "Lists/dev", connected=False)
    metrics.delivered("bob", 0)
    return metrics


def family(text: str, name: str) -> list[str]:
    """The lines of one metric family, its HELP and TYPE lines included."""
    starts = (f"# HELP {name} ", f"# TYPE {name} ", f"{name}{{", f"{name} ")
    return [line for line in text.splitlines() if line.startswith(starts)]


def test_render_sums_and_labels_per_account() -> None:
    text = busy_metrics().render()
    assert family(text, "fetchd_messages_fetched_total") == [
        "# HELP fetchd_messages_fetched_total Messages downloaded.",
        "# TYPE fetchd_messages_fetched_total counter",
        'fetchd_messages_fetched_total{account="alice"} 4',
        'fetchd_messages_fetched_total{account="bob"} 0',
    ]
    assert family(text, "fetchd_errors_total")[2:] == [
        'fetchd_errors_total{account="alice",kind="config"} 0',
        'fetchd_errors_total{account="alice",kind="internal"} 0',
        'fetchd_errors_total{account="alice",kind="permanent"} 0',
        'fetchd_errors_total{account="alice",kind="temporary"} 2',
        'fetchd_errors_total{account="bob",kind="config"} 0',
        'fetchd_errors_total{account="bob",kind="internal"} 0',
        'fetchd_errors_total{account="bob",kind="permanent"} 0',
        'fetchd_errors_total{account="bob",kind="temporary"} 0',
    ]
    assert family(text, "fetchd_polls_total")[1:] == [
        "# TYPE fetchd_polls_total counter",
        'fetchd_polls_total{account="alice",result="failed"} 1',
        'fetchd_polls_total{account="alice",result="ok"} 1',
        'fetchd_polls_total{account="bob",result="failed"} 0',
        'fetchd_polls_total{account="bob",result="ok"} 0',
    ]
    # The failed poll came last: its duration shows, the earlier success keeps its time.
    assert family(text, "fetchd_last_success_timestamp_seconds")[1:] == [
        "# TYPE fetchd_last_success_timestamp_seconds gauge",
        'fetchd_last_success_timestamp_seconds{account="alice"} 1764778837.25',
        'fetchd_last_success_timestamp_seconds{account="bob"} 0',
    ]
    assert family(text, "fetchd_poll_duration_seconds")[1:] == [
        "# TYPE fetchd_poll_duration_seconds gauge",
        'fetchd_poll_duration_seconds{account="alice"} 0.25',
    ]
    assert family(text, "fetchd_idle_connected")[2:] == [
        'fetchd_idle_connected{account="alice",folder="INBOX"} 1',
        'fetchd_idle_connected{account="alice",folder="Lists/dev"} 0',
    ]
    lines = text.splitlines()
    for line in (
        'fetchd_bytes_fetched_total{account="alice"} 1234',
        'fetchd_messages_delivered_total{account="alice"} 3',
        'fetchd_messages_delivered_total{account="bob"} 0',
        'fetchd_messages_refused_total{account="alice"} 1',
        "fetchd_accounts 2",
        'fetchd_build_info{version="0.1.0"} 1',
        "fetchd_up 1",
    ):
        assert line in lines


def test_render_is_well_formed_exposition_text() -> None:
    text = busy_metrics().render()
    assert text.endswith("\n")
    typed: dict[str, str] = {}
    seen_samples: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge") and name not in typed
            typed[name] = kind
            continue
        match = SAMPLE.fullmatch(line)
        assert match, line
        name = match[1]
        assert name in typed, f"{name} sampled before its TYPE line"
        assert name == list(typed)[-1], f"{name} not contiguous"
        assert (typed[name] == "counter") == name.endswith("_total")
        seen_samples.add(name)
    assert len(typed) == 12 and seen_samples == set(typed)


def test_a_new_metrics_object_has_the_global_series_only() -> None:
    lines = Metrics().render().splitlines()
    samples = [line for line in lines if not line.startswith("#")]
    assert samples == ["fetchd_accounts 0", "fetchd_up 1"]


def test_first_mention_creates_the_counters_at_zero() -> None:
    metrics = Metrics()
    metrics.idle("carol", "INBOX", connected=False)
    lines = metrics.render().splitlines()
    for line in (
        'fetchd_messages_fetched_total{account="carol"} 0',
        'fetchd_bytes_fetched_total{account="carol"} 0',
        'fetchd_messages_delivered_total{account="carol"} 0',
        'fetchd_messages_refused_total{account="carol"} 0',
        'fetchd_errors_total{account="carol",kind="permanent"} 0',
        'fetchd_polls_total{account="carol",result="ok"} 0',
        'fetchd_last_success_timestamp_seconds{account="carol"} 0',
        'fetchd_idle_connected{account="carol",folder="INBOX"} 0',
    ):
        assert line in lines


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.delivered('we"ird\\name\nx', 2)
    metrics.idle("a", 'Folder "x"', connected=True)
    lines = metrics.render().splitlines()
    assert 'fetchd_messages_delivered_total{account="we\\"ird\\\\name\\nx"} 2' in lines
    assert 'fetchd_idle_connected{account="a",folder="Folder \\"x\\""} 1' in lines
    assert all(SAMPLE.fullmatch(line) for line in lines if not line.startswith("#"))


def test_forget_drops_every_series_of_the_account() -> None:
    metrics = busy_metrics()
    metrics.forget("alice")
    text = metrics.render()
    assert '"alice"' not in text
    assert 'fetchd_messages_delivered_total{account="bob"} 0' in text.splitlines()
    # Mentioned again, it starts over from zero.
    metrics.fetched("alice", 1, 10)
    assert 'fetchd_messages_fetched_total{account="alice"} 1' in metrics.render().splitlines()
    assert 'fetchd_errors_total{account="alice",kind="temporary"} 0' in metrics.render()


def test_set_info_replaces_the_version() -> None:
    metrics = Metrics()
    metrics.set_info(1, "0.1.0")
    metrics.set_info(3, "0.2.0")
    samples = [line for line in metrics.render().splitlines() if "build_info{" in line]
    assert samples == ['fetchd_build_info{version="0.2.0"} 1']
    assert "fetchd_accounts 3" in metrics.render().splitlines()


@dataclass
class Health:
    ok: bool = True
    reason: str = ""

    def __call__(self) -> tuple[bool, str]:
        return self.ok, self.reason


@dataclass
class Listener:
    port: int
    metrics: Metrics
    health: Health


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    metrics = busy_metrics()
    health = Health()
    server = await serve(metrics, "127.0.0.1", 0, health, client_timeout=0.2)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Listener(port, metrics, health)
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def parse(data: bytes) -> Reply:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data
    status_line, *fields = head.decode("ascii").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for field in fields:
        name, value = field.split(": ", 1)
        headers[name.lower()] = value
    return Reply(int(status), headers, body)


async def exchange(port: int, request: bytes) -> bytes:
    """Send a raw request and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def get(port: int, request: bytes) -> Reply:
    reply = parse(await exchange(port, request))
    assert reply.headers["connection"] == "close"
    assert int(reply.headers["content-length"]) == len(reply.body)
    return reply


async def test_metrics_over_http(listener: Listener) -> None:
    reply = await get(listener.port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert reply.status == 200
    assert reply.headers["content-type"] == CONTENT_TYPE
    assert reply.body == listener.metrics.render().encode()
    assert b'fetchd_messages_fetched_total{account="alice"} 4\n' in reply.body


async def test_metrics_reflect_updates_between_scrapes(listener: Listener) -> None:
    listener.metrics.delivered("bob", 5)
    reply = await get(listener.port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
    assert b'fetchd_messages_delivered_total{account="bob"} 5\n' in reply.body


async def test_urllib_client(listener: Listener) -> None:
    """A real HTTP client, not hand-written bytes, reads both endpoints."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    base = f"http://127.0.0.1:{listener.port}"

    def fetch(path: str) -> tuple[int, str, bytes]:
        try:
            with opener.open(base + path, timeout=5) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.headers["Content-Type"], e.read()

    status, ctype, body = await asyncio.to_thread(fetch, "/metrics")
    assert (status, ctype) == (200, CONTENT_TYPE)
    assert body.decode().endswith("fetchd_up 1\n")
    listener.health.ok, listener.health.reason = False, "no account polled for 2h"
    status, _, body = await asyncio.to_thread(fetch, "/healthz")
    assert (status, body) == (503, b"no account polled for 2h\n")


async def test_healthz_ok_and_failing(listener: Listener) -> None:
    reply = await get(listener.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert (reply.status, reply.body) == (200, b"ok\n")
    listener.health.ok, listener.health.reason = False, "alice: parked after a permanent error"
    reply = await get(listener.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert (reply.status, reply.body) == (503, b"alice: parked after a permanent error\n")
    assert reply.headers["content-type"].startswith("text/plain")


async def test_a_failing_health_check_is_a_500(
    listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("bug")

    server = await serve(listener.metrics, "127.0.0.1", 0, broken, client_timeout=0.2)
    try:
        reply = await get(server.sockets[0].getsockname()[1], b"GET /healthz HTTP/1.0\r\n\r\n")
    finally:
        server.close()
        await server.wait_closed()
    assert reply.status == 500
    assert any(r.exc_info and r.name == "fetchd.metrics" for r in caplog.records)


async def test_head_has_the_headers_but_no_body(listener: Listener) -> None:
    data = await exchange(listener.port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    reply = parse(data)
    assert reply.status == 200 and reply.body == b""
    assert int(reply.headers["content-length"]) == len(listener.metrics.render().encode())


async def test_empty_lines_before_the_request_line_are_skipped(listener: Listener) -> None:
    reply = await get(listener.port, b"\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n")
    assert (reply.status, reply.body) == (200, b"ok\n")


async def test_unknown_path_is_404(listener: Listener) -> None:
    for path in (b"/", b"/metricsx", b"/metrics/", b"http://127.0.0.1/metrics"):
        reply = await get(listener.port, b"GET " + path + b" HTTP/1.0\r\n\r\n")
        assert reply.status == 404, path


async def test_other_methods_are_405(listener: Listener) -> None:
    for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS"):
        reply = await get(listener.port, method + b" /metrics HTTP/1.0\r\n\r\n")
        assert reply.status == 405, method
        assert reply.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "request_head",
    [
        b"\x00\x01\x02garbage\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET  /metrics HTTP/1.0\r\n\r\n",
        b"GET /metrics HTTP/1.0 extra\r\n\r\n",
        b"GET /metrics FTP/1.0\r\n\r\n",
        b"GET /met\x1brics HTTP/1.0\r\n\r\n",
        b"GET /metrics HTTP/1.0\r\nno colon here\r\n\r\n",
        b"GET /metrics HTTP/1.0\r\n folded: header\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\n\n",  # a TLS hello, cut short
    ],
)
async def test_malformed_requests_are_400(listener: Listener, request_head: bytes) -> None:
    reply = await get(listener.port, request_head)
    assert reply.status == 400


async def test_a_request_cut_short_is_400(listener: Listener) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n")
        writer.write_eof()
        reply = parse(await asyncio.wait_for(reader.read(), 5))
    finally:
        writer.close()
        await writer.wait_closed()
    assert reply.status == 400


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /metrics HTTP/1.0\r\nX-Big: " + b"a" * (4 * MAX_HEAD) + b"\r\n\r\n",
        b"GET /metrics HTTP/1.0\r\n" + b"X-Many: 0123456789\r\n" * (MAX_HEAD // 20 + 1) + b"\r\n",
        b"GET /" + b"m" * (2 * MAX_HEAD) + b" HTTP/1.0\r\n\r\n",
    ],
)
async def test_an_oversized_head_is_431_and_closed(listener: Listener, request_head: bytes) -> None:
    reply = parse(await exchange(listener.port, request_head))  # read() ends: the server closed
    assert reply.status == 431
    assert reply.headers["connection"] == "close"


async def test_a_head_just_under_the_limit_is_served(listener: Listener) -> None:
    start = b"GET /healthz HTTP/1.0\r\nX-Pad: "
    end = b"\r\n\r\n"
    reply = await get(listener.port, start + b"a" * (MAX_HEAD - len(start) - len(end)) + end)
    assert reply.status == 200


async def test_a_silent_client_is_disconnected(listener: Listener) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    try:
        start = time.monotonic()
        data = await asyncio.wait_for(reader.read(), 5)
        elapsed = time.monotonic() - start
    finally:
        writer.close()
        await writer.wait_closed()
    assert data == b""
    assert 0.15 < elapsed < 2


async def test_a_trickling_client_is_disconnected(listener: Listener) -> None:
    """The timeout covers the whole request head, not each read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    start = time.monotonic()
    try:
        for byte in b"GET /metrics HTTP/1.0\r\nX: " + b"y" * 100:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.02)
            if reader.at_eof() or time.monotonic() - start > 5:
                break
        data = await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:  # the server closed between two bytes
        data = b""
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()
    assert data == b""
    assert time.monotonic() - start < 2


async def test_the_server_keeps_serving_after_bad_clients(listener: Listener) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.transport.abort()  # reset before sending anything
    await exchange(listener.port, b"\xff\xfe\r\n\r\n")
    reply = await get(listener.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert reply.status == 200


async def test_a_connection_flood_is_capped() -> None:
    server = await serve(Metrics(), "127.0.0.1", 0, lambda: (True, "ok"), client_timeout=5)
    port = server.sockets[0].getsockname()[1]
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CLIENTS + 8)]
    try:
        await asyncio.sleep(0.2)
        dropped = 0
        for reader, _ in idle:
            try:
                async with asyncio.timeout(0.05):
                    if await reader.read(1) == b"":
                        dropped += 1
            except (TimeoutError, ConnectionError):
                dropped += isinstance(reader.exception(), ConnectionError)
        assert dropped >= 8, "connections beyond the cap are closed at once"
    finally:
        for _, writer in idle:
            writer.close()
        server.close()
        await server.wait_closed()
