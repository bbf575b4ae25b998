"""`fetchd run` as a service runs it: real processes, real signals, a real Dovecot.

SIGHUP applies only the difference (an unchanged IDLE account keeps its connection), a broken
file changes nothing, SIGUSR1 polls now, SIGTERM stops after the message in hand, systemd hears
READY/RELOADING/STATUS/STOPPING/WATCHDOG, and a silent server holds up nobody.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import ConfigWriter, strip_received
from tests.support.dovecot import Dovecot
from tests.support.sink import Sink, smtp_sink
from tests.test_cli import fetchd
from tests.test_interop import logins

log = logging.getLogger("tests.daemon")


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    log: Path
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        """Every log line; each must be one JSON object (--log-format json)."""
        return [json.loads(line) for line in self.text().splitlines()]

    async def logged(self, needle: str, limit: float = 30) -> None:
        async with asyncio.timeout(limit):
            while needle not in self.text():  # noqa: ASYNC110 - a file written by another process
                await asyncio.sleep(0.05)

    async def noted(self, needle: str, limit: float = 30) -> None:
        async with asyncio.timeout(limit):
            while not any(needle in n for n in self.notes):  # noqa: ASYNC110
                await asyncio.sleep(0.02)


@asynccontextmanager
async def daemon(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[Daemon]:
    """`fetchd run` with a notify socket, logging JSON to a file (a pipe nobody reads could
    block it)."""
    directory = config.parent
    logfile = directory / "fetchd.log"
    notify_path = str(directory / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.setblocking(False)
    environ = {**os.environ, "NOTIFY_SOCKET": notify_path, **(env or {})}
    with open(logfile, "wb") as err:  # noqa: ASYNC230 - a quick local open
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fetchd",
            "run",
            "-c",
            str(config),
            "--log-format",
            "json",
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
            env=environ,
        )
    d = Daemon(proc, logfile)
    loop = asyncio.get_running_loop()

    async def listen() -> None:
        while True:
            data = await loop.sock_recv(sock, 4096)
            d.notes.append(data.decode())

    listener = asyncio.create_task(listen())
    try:
        yield d
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 40)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await asyncio.sleep(0.1)
        listener.cancel()
        sock.close()
        log.warning("fetchd log:\n%s", logfile.read_text(errors="replace")[-4000:])


async def test_reload_signals_status_and_systemd(
    dovecot: Dovecot, sink: Sink, configs: ConfigWriter
) -> None:
    users = {k: f"hup-{k}-{os.getpid()}" for k in ("same", "gone", "edit", "new", "lazy")}
    for user in users.values():
        dovecot.add_user(user, f"pw-{user}")
        dovecot.deliver(user, [f"Subject: {user} first\n\nfirst\n".encode()])

    def acc(kind: str, **extra: Any) -> dict[str, Any]:
        protocol = "imap" if kind == "same" else "pop3"
        options: dict[str, Any] = {"interval": 1}
        if kind == "same":
            options = {"idle": True}
        if kind == "lazy":
            options = {"interval": 3600}
        a = configs.account(
            dovecot,
            users[kind],
            protocol=protocol,
            mode="implicit",
            sink_port=sink.port,
            **options,
        )
        a["name"] = kind
        a.update(extra)
        return a

    http = socket.socket()
    http.bind(("127.0.0.1", 0))
    http_port = http.getsockname()[1]
    http.close()
    top = {"http": {"listen": f"127.0.0.1:{http_port}"}}
    config = configs.write([acc("same"), acc("gone"), acc("edit"), acc("lazy")], **top)

    def arrived(subject: str) -> bool:
        return any(subject.encode() in a.data for a in sink.accepted)

    async def until_arrived(*subjects: str) -> None:
        async with asyncio.timeout(30):
            while not all(arrived(s) for s in subjects):  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    async with daemon(config, env={"WATCHDOG_USEC": "1000000"}) as d:
        await d.noted("READY=1")
        await until_arrived(*(f"{u} first" for u in users.values() if "new" not in u))
        await d.noted("WATCHDOG=1")

        # Everything a running daemon shows: status, health, metrics, the lock.
        status, out, _ = await fetchd("status", "-c", str(config))
        assert status == 0, out
        assert f"fetchd (pid {d.proc.pid}) running" in out
        for name in ("same", "gone", "edit", "lazy"):
            assert any(line.startswith(name) and " ok " in line for line in out.splitlines()), out
        status, out, _ = await fetchd("health", "-c", str(config))
        assert (status, out.split(":")[0]) == (0, "ok")
        status, _, err = await fetchd("once", "-c", str(config))
        assert status == 1 and f"another fetchd (pid {d.proc.pid})" in err
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics").read()
        )
        assert b'fetchd_messages_delivered_total{account="edit"} 1' in body
        assert b'fetchd_idle_connected{account="same",folder="INBOX"} 1' in body

        # SIGUSR1: the lazy account (interval 1 h) polls now.
        dovecot.deliver(users["lazy"], [b"Subject: lazy second\n\nnow\n"])
        d.proc.send_signal(signal.SIGUSR1)
        await until_arrived("lazy second")

        # SIGHUP: one added, one removed, one changed, two unchanged.
        same_logins = logins(dovecot, users["same"])
        config = configs.write(
            [
                acc("same"),
                acc(
                    "edit", deliver={"smtp": f"127.0.0.1:{sink.port}", "to": ["changed@localhost"]}
                ),
                acc("new"),
                acc("lazy"),
            ],
            **top,
        )
        d.proc.send_signal(signal.SIGHUP)
        await d.logged("1 added, 1 removed, 1 changed, 2 unchanged")
        await d.noted("RELOADING=1")
        for kind in ("same", "gone", "edit"):
            dovecot.save(users[kind], f"Subject: {users[kind]} second\r\n\r\nx\r\n".encode())
        await until_arrived(f"{users['new']} first", f"{users['same']} second")
        await until_arrived(f"{users['edit']} second")
        edited = [a for a in sink.accepted if f"{users['edit']} second".encode() in a.data]
        assert edited[0].rcpt_tos == ("changed@localhost",)
        assert logins(dovecot, users["same"]) == same_logins, "the unchanged IDLE account stayed"
        await asyncio.sleep(2.5)  # two intervals of the removed account
        assert not arrived(f"{users['gone']} second") and dovecot.count(users["gone"]) == 1

        # A broken file changes nothing; the error is logged and shown by status.
        state_file = configs.directory / "state.sqlite3"
        config.write_text(f"state_file: {state_file}\naccounts:\n  - {{name: broken, prot: 1}}\n")
        d.proc.send_signal(signal.SIGHUP)
        await d.logged("reload failed, the running configuration stays")
        await d.noted("last reload failed")
        dovecot.save(users["edit"], f"Subject: {users['edit']} third\r\n\r\nx\r\n".encode())
        await until_arrived(f"{users['edit']} third")
        status, out, _ = await fetchd("status", "-c", str(config))
        assert status == 0 and "configuration error" in out and "is required" in out, out
        assert "last reload FAILED" in out
        assert any(line.startswith("edit ") and " ok " in line for line in out.splitlines())

        # SIGTERM: a clean stop.
        d.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(d.proc.wait(), 40) == 0
        await d.noted("STOPPING=1")

    lines = d.lines()
    assert any(line["msg"] == "fetchd stopped" for line in lines)
    assert any(line.get("account") == "edit" and "ok:" in line["msg"] for line in lines)
    text = d.text()
    for user in users.values():
        assert f"pw-{user}" not in text, "a password reached the log"
    assert "first\r\n" not in text and "\\nfirst" not in text, "a message body reached the log"


async def test_sigterm_mid_poll_finishes_the_message_in_hand_and_loses_nothing(
    dovecot: Dovecot, mailbox_user: str, configs: ConfigWriter
) -> None:
    messages = [f"Subject: slow {i}\n\nbody {i}\n".encode() for i in range(20)]
    dovecot.deliver(mailbox_user, messages)
    async with smtp_sink(delay=0.5) as slow:
        account = configs.account(
            dovecot, mailbox_user, protocol="imap", mode="implicit", sink_port=slow.port
        )
        config = configs.write([account])
        async with daemon(config) as d:
            async with asyncio.timeout(30):
                await slow.wait_for(2)
            d.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(d.proc.wait(), 20) == 0, d.text()[-2000:]
        delivered = len(slow.accepted)
    assert 2 <= delivered < 20, "it stopped after the message in hand, not at the end"
    assert dovecot.count(mailbox_user) == 20 - delivered, "what was delivered is gone, no more"
    async with smtp_sink() as sink:
        account["deliver"]["smtp"] = f"127.0.0.1:{sink.port}"
        config = configs.write([account])
        status, out, _ = await fetchd("once", "-c", str(config))
        assert status == 0, out
        got = {strip_received(a.data)[1] for a in slow.accepted + sink.accepted}
    assert len(got) == 20 and len(slow.accepted) + len(sink.accepted) == 20
    assert dovecot.count(mailbox_user) == 0


async def test_a_silent_server_does_not_delay_fifty_others(
    dovecot: Dovecot, sink: Sink, configs: ConfigWriter
) -> None:
    hung: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)  # accepts the connection and never says a word

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    silent_port = server.sockets[0].getsockname()[1]
    accounts = []
    for i in range(50):
        user = f"many{i}-{os.getpid()}"
        dovecot.add_user(user, f"pw-{user}")
        dovecot.deliver(user, [f"Subject: many {i}\n\nx\n".encode()])
        accounts.append(
            configs.account(dovecot, user, protocol="pop3", mode="implicit", sink_port=sink.port)
        )
    mute = configs.account(
        dovecot,
        f"many0-{os.getpid()}",
        protocol="pop3",
        mode="implicit",
        sink_port=sink.port,
        timeout=120,
    )
    mute.update(name="mute", port=silent_port, password="pw")
    config = configs.write([mute, *accounts], max_connections=100)
    try:
        async with daemon(config) as d:
            async with asyncio.timeout(60):
                await sink.wait_for(50)
            assert hung, "the silent server was connected to"
            assert "mute: FAILED" not in d.text(), "the others finished while it still waited"
    finally:
        for w in hung:
            w.close()
        server.close()
