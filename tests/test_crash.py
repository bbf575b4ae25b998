"""Crash safety: `fetchd once` killed with SIGKILL at random points, then run to the end.

Every message must arrive at least once, no more duplicates than kills, and nothing may be left
undelivered and deleted.
"""

from __future__ import annotations

import asyncio
import random
import re
import sys
from collections import Counter

import pytest

from tests.conftest import ConfigWriter
from tests.support.dovecot import Dovecot
from tests.support.sink import Sink

MESSAGES = 500
KILLS = 20


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_sigkill_at_random_points_loses_nothing(
    dovecot: Dovecot, mailbox_user: str, sink: Sink, configs: ConfigWriter, protocol: str
) -> None:
    sink.delay = 0.02  # a slow MTA stretches the poll, so kills land all through it
    rng = random.Random(f"crash-{protocol}")
    line = b"a line of the body\n"
    dovecot.deliver(
        mailbox_user,
        [
            b"Message-ID: <m%d@crash.test>\nSubject: crash %d\n\n" % (i, i)
            + line * rng.randint(1, 300)
            for i in range(MESSAGES)
        ],
    )
    config = configs.write(
        [
            configs.account(
                dovecot, mailbox_user, protocol=protocol, mode="implicit", sink_port=sink.port
            )
        ]
    )
    kills = 0
    for _ in range(KILLS):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fetchd",
            "once",
            "-q",
            "-c",
            str(config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await asyncio.wait_for(proc.wait(), rng.uniform(0.3, 1.2))
        except TimeoutError:
            proc.kill()
            await proc.wait()
            kills += 1
        if dovecot.count(mailbox_user) == 0:
            break
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fetchd",
        "once",
        "-q",
        "-c",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode()

    delivered = Counter(
        int(m.group(1))
        for a in sink.accepted
        if (m := re.search(rb"Message-ID: <m(\d+)@crash", a.data))
    )
    assert sorted(delivered) == list(range(MESSAGES)), "a message was lost"
    duplicates = sum(delivered.values()) - MESSAGES
    assert duplicates <= kills, f"{duplicates} duplicates for {kills} kills"
    assert dovecot.count(mailbox_user) == 0
    assert kills == KILLS, "the poll finished before it was killed often enough"
