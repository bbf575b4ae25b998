"""IMAP IDLE push: `fetchd run` keeps a connection per watched folder on every account at once,
delivers new mail as it arrives, and re-establishes connections that die."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import statistics
import time

from tests.conftest import ConfigWriter
from tests.support.dovecot import Dovecot
from tests.support.sink import Sink
from tests.test_daemon import daemon

log = logging.getLogger("tests.idle")


def idle_account(
    configs: ConfigWriter, dovecot: Dovecot, user: str, port: int
) -> dict[str, object]:
    return configs.account(
        dovecot, user, protocol="imap", mode="implicit", sink_port=port, idle=True, interval=2
    )


def subject_number(data: bytes) -> int:
    m = re.search(rb"Subject: push (\d+)", data)
    assert m, data[:300]
    return int(m.group(1))


async def test_new_mail_is_pushed_and_a_killed_connection_comes_back(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter
) -> None:
    dovecot.deliver(mailbox_user, [b"Subject: push 0\n\nalready there\n"])
    config = configs.write([idle_account(configs, dovecot, mailbox_user, sink.port)])
    async with daemon(config):
        async with asyncio.timeout(30):
            await sink.wait_for(1)
        saved = time.monotonic()
        dovecot.save(mailbox_user, b"Subject: push 1\r\n\r\nwhile idling\r\n")
        async with asyncio.timeout(30):
            await sink.wait_for(2)
        log.warning("IDLE push latency: %.3f s", sink.accepted[1].at - saved)
        dovecot.doveadm("kick", mailbox_user)  # the server drops the IDLE connection
        await asyncio.sleep(0.5)
        dovecot.save(mailbox_user, b"Subject: push 2\r\n\r\nafter reconnecting\r\n")
        async with asyncio.timeout(60):
            await sink.wait_for(3)
    assert [subject_number(a.data) for a in sink.accepted] == [0, 1, 2]
    assert dovecot.count(mailbox_user) == 0


async def test_two_hundred_accounts_idle_at_once(
    dovecot: Dovecot, sink: Sink, configs: ConfigWriter
) -> None:
    users = [f"idle{i}" for i in range(200)]
    for user in users:
        dovecot.add_user(user, f"pw-{user}")
        dovecot.deliver(user, [b"Subject: push 0\n\nhello\n"])
    config = configs.write([idle_account(configs, dovecot, u, sink.port) for u in users])
    rng = random.Random(200)
    async with daemon(config):
        async with asyncio.timeout(120):
            await sink.wait_for(len(users))  # every account connected and caught up
        await asyncio.sleep(1)  # let the last ones settle into IDLE
        sent: dict[int, float] = {}
        for n in range(1, 101):
            user = rng.choice(users)
            sent[n] = time.monotonic()
            await asyncio.to_thread(
                dovecot.save, user, b"Subject: push %d\r\n\r\nto %s\r\n" % (n, user.encode())
            )
        async with asyncio.timeout(120):
            await sink.wait_for(len(users) + 100)
    latencies = sorted(
        a.at - sent[n] for a in sink.accepted[len(users) :] if (n := subject_number(a.data)) in sent
    )
    assert len(latencies) == 100
    p50 = statistics.median(latencies)
    p99 = latencies[98]
    log.warning("IDLE latency over 200 accounts, 100 messages: p50 %.3f s, p99 %.3f s", p50, p99)
    for user in users:
        assert dovecot.count(user) == 0
