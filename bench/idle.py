"""Scenario (d): many accounts in IMAP IDLE under ``fetchd run``.

Every mailbox starts with one message, so "all of them delivered" means every account has
connected, logged in and caught up; the daemon's metrics endpoint then tells when every IDLE
connection is up. Then messages arrive one at a time in random mailboxes, at a fixed rate, and
each one's delay from its arrival in Dovecot to its acceptance by the sink is measured:

- ``save`` (default, as tests/test_idle.py does): ``doveadm save``; the clock starts before
  doveadm does, so the delay includes doveadm's own start-up (reported separately);
- ``maildir``: the message is written to ``tmp/`` and renamed into ``new/``, as an MDA
  delivering to a Maildir does; the clock starts at the rename, and Dovecot learns of it through
  inotify.

Reported: fetchd's peak RSS (VmHWM) and RSS once idle and at the end, its CPU time, Dovecot's,
the time to get every account idle, and the delay's p50/p90/p99/max.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.clients import fetchd_account, fetchd_argv, fetchd_env, write_fetchd_config
from bench.mail import Message, body
from bench.server import BenchServer, process_cpu, process_memory
from bench.sink import Sink
from tests.support.dovecot import free_port, mail_owner


@dataclass
class IdleResult:
    accounts: int
    messages: int
    inject: str
    rate: float
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    seconds_to_all_idle: float = 0.0
    rss_idle_mb: float = 0.0
    rss_end_mb: float = 0.0
    peak_rss_mb: float = 0.0
    fetchd_cpu_startup: float = 0.0
    fetchd_cpu_total: float = 0.0
    server_cpu_total: float = 0.0
    inject_seconds_median: float = 0.0
    delays: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.delays:
            return float("nan")
        ordered = sorted(self.delays)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "delays"}
        d.update(
            p50=self.percentile(0.50),
            p90=self.percentile(0.90),
            p99=self.percentile(0.99),
            max=max(self.delays) if self.delays else float("nan"),
            mean=statistics.fmean(self.delays) if self.delays else float("nan"),
            delays=[round(x, 4) for x in self.delays],
        )
        return d


def _idle_connections(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return -1
    return sum(
        1
        for line in text.splitlines()
        if line.startswith("fetchd_idle_connected{") and line.rstrip().endswith(" 1")
    )


def _maildir_write(server: BenchServer, user: str, data: bytes, name: str) -> float:
    """Write into tmp/, rename into new/; returns the moment of the rename."""
    uid, gid, _ = mail_owner()
    box = server.dovecot.maildir(user)
    tmp = box / "tmp" / name
    tmp.write_bytes(data)
    os.chown(tmp, uid, gid)
    at = time.monotonic()
    os.rename(tmp, box / "new" / name)
    return at


async def run_idle(
    server: BenchServer,
    workdir: Path,
    *,
    accounts: int,
    messages: int,
    inject: str,
    rate: float,
    seed: int,
    log: Path,
) -> IdleResult:
    result = IdleResult(accounts, messages, inject, rate)
    boxes = server.add_mailboxes(accounts, prefix="idle")
    text = body(random.Random(seed), 3_000, "text").encode()

    def message(account: int, seq: int) -> Message:
        head = (
            f"From: sender@example.org\nTo: idle{account}@example.net\nSubject: push {seq}\n"
            f"Message-ID: <push.{account}.{seq}@example.org>\nX-Bench-Seq: {seq}\n"
        )
        return Message(head.encode() + text)

    def first(i: int, _box: object) -> list[Message]:
        return [message(i, 0)]

    await asyncio.to_thread(server.load, boxes, first)
    sink = Sink(quickack=True, track=True)
    await sink.start()
    http_port = free_port()
    config = write_fetchd_config(
        workdir,
        [fetchd_account(server, b, "imap", sink.port, idle=True, interval=60) for b in boxes],
        max_connections=200,
        http={"listen": f"127.0.0.1:{http_port}"},
    )
    server_before = server.cpu_seconds()
    with open(log, "wb") as err:  # noqa: ASYNC230 - a quick local open
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *fetchd_argv(config, "run"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
            env=fetchd_env(),
        )
    rng = random.Random(seed)
    try:
        try:
            async with asyncio.timeout(300):
                await sink.stats.wait_for(accounts)
                while _idle_connections(http_port) < accounts:
                    if proc.returncode is not None:
                        raise RuntimeError(f"fetchd exited with status {proc.returncode}")
                    await asyncio.sleep(0.2)
        except TimeoutError:
            result.problems.append(
                f"not every account got idle within 300 s: {sink.stats.messages} delivered, "
                f"{_idle_connections(http_port)} idling"
            )
            return result
        result.seconds_to_all_idle = time.monotonic() - started
        await asyncio.sleep(1.0)  # let the last ones settle into IDLE
        memory = process_memory(proc.pid)
        result.rss_idle_mb = memory.get("VmRSS", 0.0)
        result.fetchd_cpu_startup = process_cpu(proc.pid)
        sent: dict[int, float] = {}
        inject_times: list[float] = []
        t0 = time.monotonic()
        for n in range(1, messages + 1):
            due = t0 + (n - 1) / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            i = rng.randrange(accounts)
            box = boxes[i]
            data = message(i, n).data
            if inject == "maildir":
                name = f"{time.time_ns()}.bench{n}.push"
                sent[n] = await asyncio.to_thread(_maildir_write, server, box.user, data, name)
            else:
                before = time.monotonic()
                sent[n] = before
                await asyncio.to_thread(server.dovecot.save, box.user, data)
                inject_times.append(time.monotonic() - before)
        try:
            async with asyncio.timeout(120):
                await sink.stats.wait_for(accounts + messages)
        except TimeoutError:
            result.problems.append(
                f"only {sink.stats.messages - accounts} of {messages} pushed messages arrived"
            )
        arrivals = sink.stats.arrivals
        result.delays = [arrivals[n] - sent[n] for n in sent if n in arrivals]
        if inject_times:
            result.inject_seconds_median = statistics.median(inject_times)
        memory = process_memory(proc.pid)
        result.rss_end_mb = memory.get("VmRSS", 0.0)
        result.peak_rss_mb = memory.get("VmHWM", 0.0)
        result.fetchd_cpu_total = process_cpu(proc.pid)
        result.server_cpu_total = server.cpu_seconds() - server_before
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await sink.stop()
    left = await asyncio.to_thread(server.counts, boxes)
    if sum(left.values()):
        result.problems.append(f"{sum(left.values())} messages left on the server")
    if len(result.delays) != messages:
        result.problems.append(f"{len(result.delays)} of {messages} pushed messages were timed")
    result.ok = not result.problems
    return result
