"""Scheduling, without servers and without sleeping: the poll and the clock are injected."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from fetchd.config import Account, Config, Delivery, Secret, TLSSettings
from fetchd.errors import PermanentError, TemporaryError
from fetchd.poller import PollResult
from fetchd.state import State
from fetchd.supervisor import PARKED_RETRY, Supervisor, next_delay


def acct(name: str, host: str = "mail.test", interval: float = 100.0, **kw: object) -> Account:
    return Account(
        name=name,
        protocol="pop3",
        host=host,
        port=995,
        user=name,
        password=Secret("pw"),
        deliver=Delivery(to=("u@localhost",)),
        tls=TLSSettings(),
        interval=interval,
        **kw,  # type: ignore[arg-type]
    )


def config(accounts: list[Account], **kw: object) -> Config:
    return Config(path="fetchd.yaml", state_file="", accounts=tuple(accounts), **kw)  # type: ignore[arg-type]


class Clock:
    """A fake clock: ``wait`` records what was asked and returns at once, or blocks on
    ``hold`` so a test decides when time passes."""

    def __init__(self) -> None:
        self.asked: dict[str, list[float]] = defaultdict(list)
        self.hold = False
        self.release = asyncio.Event()

    async def wait(self, delay: float, events: Sequence[asyncio.Event]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.asked[task.get_name()].append(delay)
        if self.hold and delay > 0:
            waiters = [asyncio.ensure_future(e.wait()) for e in (*events, self.release)]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
        else:
            await asyncio.sleep(0)


class Mailboxes:
    """Fake servers: each poll is logged; a script of errors per account is played in order."""

    def __init__(self) -> None:
        self.polls: list[str] = []
        self.errors: dict[str, list[BaseException | None]] = {}
        self.active: dict[str, int] = defaultdict(int)
        self.most: dict[str, int] = defaultdict(int)
        self.total_most = 0
        self.gate: asyncio.Event | None = None

    async def poll(self, account: Account, stopping: object) -> PollResult:
        self.polls.append(account.name)
        self.active[account.host] += 1
        self.most[account.host] = max(self.most[account.host], self.active[account.host])
        self.total_most = max(self.total_most, sum(self.active.values()))
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)
            script = self.errors.get(account.name)
            if script:
                error = script.pop(0)
                if error is not None:
                    raise error
            return PollResult(fetched=1, delivered=1, bytes=10)
        finally:
            self.active[account.host] -= 1


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[State]:
    s = await State.open(str(tmp_path / "state.sqlite3"))
    yield s
    await s.close()


@asynccontextmanager
async def running(sup: Supervisor) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(sup.run(grace=5))
    await asyncio.sleep(0)
    try:
        yield task
    finally:
        sup.stop.set()
        async with asyncio.timeout(10):
            await task


async def until(condition: object, limit: float = 5.0) -> None:
    async with asyncio.timeout(limit):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110 - polled state
            await asyncio.sleep(0.001)


def test_next_delay_backs_off_and_caps_and_parks() -> None:
    assert next_delay(300, 0, False, 0.5) == 300
    assert [next_delay(300, n, False, 0.5) for n in (1, 2, 3)] == [60, 120, 240]
    assert next_delay(300, 20, False, 0.5) == 3600  # the cap
    assert next_delay(300, 1, True, 0.5) == PARKED_RETRY
    assert next_delay(300, 0, False, 0.0) == 270 and next_delay(300, 0, False, 0.999) < 330


async def test_first_polls_are_spread_and_errors_back_off(state: State) -> None:
    clock, boxes = Clock(), Mailboxes()
    boxes.errors["a"] = [TemporaryError("down"), TemporaryError("down"), None]
    boxes.errors["b"] = [PermanentError("bad password")]
    rands = iter([0.25, 0.75] + [0.5] * 1000)
    sup = Supervisor(
        config([acct("a"), acct("b")], startup_window=40),
        state,
        rand=lambda: next(rands),
        wait=clock.wait,
        poll=boxes.poll,
    )
    async with running(sup):
        await until(lambda: boxes.polls.count("a") >= 4)
    waits = [v for v in clock.asked.values()]
    a = next(w for w in waits if w[0] == 10.0)  # 40 s window times 0.25
    b = next(w for w in waits if w[0] == 30.0)  # 40 s window times 0.75
    assert a[1:4] == [60.0, 120.0, 100.0], "back-off after failures, the interval after success"
    assert b[1] == PARKED_RETRY, "a permanent error parks the account"
    assert sup.last["a"].ok


async def test_sigusr1_polls_every_waiting_account_now(state: State) -> None:
    clock, boxes = Clock(), Mailboxes()
    clock.hold = True  # time stands still: only a wake-up can start a poll
    sup = Supervisor(
        config([acct("a"), acct("b")], startup_window=0), state, wait=clock.wait, poll=boxes.poll
    )
    async with running(sup):
        await until(lambda: len(boxes.polls) == 2)
        await asyncio.sleep(0.05)
        assert len(boxes.polls) == 2, "nothing polls before its interval"
        sup.poll_now()
        await until(lambda: len(boxes.polls) == 4)
        await asyncio.sleep(0.05)
        assert sorted(boxes.polls) == ["a", "a", "b", "b"]


async def test_limits_global_and_per_host_are_shared_fairly(state: State) -> None:
    boxes = Mailboxes()
    boxes.gate = asyncio.Event()
    accounts = [acct(f"x{i}", host="x.test") for i in range(30)]
    accounts += [acct(f"y{i}", host="y.test") for i in range(30)]
    sup = Supervisor(
        config(accounts, max_connections=12, max_connections_per_host=5),
        state,
        poll=boxes.poll,
    )
    task = asyncio.create_task(sup.run_once())
    await until(lambda: boxes.total_most >= 10)
    await asyncio.sleep(0.05)
    assert boxes.most == {"x.test": 5, "y.test": 5}, "each host stops at its limit"
    boxes.gate.set()
    outcomes = await task
    assert all(o.ok for o in outcomes) and len(outcomes) == 60
    assert boxes.most["x.test"] == 5 and boxes.total_most == 10

    boxes = Mailboxes()
    boxes.gate = asyncio.Event()
    sup = Supervisor(config(accounts, max_connections=7), state, poll=boxes.poll)
    task = asyncio.create_task(sup.run_once())
    await until(lambda: boxes.total_most >= 7)
    await asyncio.sleep(0.05)
    assert boxes.total_most == 7, "the global limit holds"
    boxes.gate.set()
    assert len(await task) == 60


async def test_a_hung_account_does_not_hold_up_the_others(state: State) -> None:
    boxes = Mailboxes()
    hang = asyncio.Event()

    async def poll(account: Account, stopping: object) -> PollResult:
        if account.name == "hung":
            await hang.wait()
        return await boxes.poll(account, stopping)

    accounts = [acct("hung")] + [acct(f"n{i}") for i in range(50)]
    sup = Supervisor(config(accounts), state, poll=poll)
    task = asyncio.create_task(sup.run_once())
    await until(lambda: len(boxes.polls) == 50)
    assert not task.done()
    hang.set()
    assert len(await task) == 51


async def test_reload_applies_only_the_difference(state: State) -> None:
    clock, boxes = Clock(), Mailboxes()
    clock.hold = True
    old = [acct("same"), acct("gone"), acct("edit")]
    sup = Supervisor(config(old, startup_window=0), state, wait=clock.wait, poll=boxes.poll)
    async with running(sup):
        await until(lambda: len(boxes.polls) == 3)
        same_task = sup._running["same"].task
        gone_task = sup._running["gone"].task
        edit_task = sup._running["edit"].task
        changes = sup.apply(
            config(
                [acct("same"), replace(acct("edit"), interval=5.0), acct("new")], startup_window=0
            )
        )
        assert (changes.added, changes.removed, changes.changed, changes.unchanged) == (
            ["new"],
            ["gone"],
            ["edit"],
            1,
        )
        await until(lambda: gone_task.done() and edit_task.done())
        await until(lambda: boxes.polls.count("new") == 1 and boxes.polls.count("edit") == 2)
        assert sup._running["same"].task is same_task and not same_task.done()
        assert boxes.polls.count("same") == 1, "the unchanged account was not touched"
        assert "gone" not in sup._running and "gone" not in sup.last
        assert sup._running["edit"].account.interval == 5.0


async def test_stop_lets_the_message_in_hand_finish_then_cancels_after_the_grace(
    state: State,
) -> None:
    seen_stop: list[bool] = []
    forever = asyncio.Event()

    async def poll(account: Account, stopping: object) -> PollResult:
        if account.name == "slow":
            while not stopping():  # type: ignore[operator]  # noqa: ASYNC110 - polled flag
                await asyncio.sleep(0.01)
            seen_stop.append(True)  # it saw the stop and returns after "the message in hand"
            return PollResult()
        await forever.wait()  # ignores the stop: cancelled after the grace period
        return PollResult()

    sup = Supervisor(config([acct("slow"), acct("stuck")], startup_window=0), state, poll=poll)
    task = asyncio.create_task(sup.run(grace=0.3))
    await asyncio.sleep(0.05)
    sup.stop.set()
    async with asyncio.timeout(5):
        await task
    assert seen_stop == [True]


async def test_a_reload_retries_a_parked_account_at_once(state: State) -> None:
    clock, boxes = Clock(), Mailboxes()
    clock.hold = True
    boxes.errors["parked"] = [PermanentError("bad password"), None]
    accounts = [acct("parked"), acct("fine")]
    sup = Supervisor(config(accounts, startup_window=0), state, wait=clock.wait, poll=boxes.poll)
    async with running(sup):
        await until(lambda: len(boxes.polls) == 2)
        sup.apply(config(accounts, startup_window=0))  # nothing changed, say a password file
        await until(lambda: boxes.polls.count("parked") == 2)
        await asyncio.sleep(0.05)
        assert boxes.polls.count("fine") == 1, "a healthy account keeps its schedule"
        assert sup.last["parked"].ok


async def test_reloads_during_a_poll_never_run_one_mailbox_twice(state: State) -> None:
    """Changed twice, removed and re-added, renamed: each time the new task waits for the old
    one to finish the message in hand, and the rename carries the state over."""
    boxes = Mailboxes()
    boxes.gate = asyncio.Event()
    await state.record("a", "", 0, "uid-1")
    base = acct("a", interval=1.0)
    sup = Supervisor(config([base], startup_window=0), state, poll=boxes.poll)
    async with running(sup):
        await until(lambda: boxes.active["mail.test"] == 1)
        sup.apply(config([replace(base, interval=2.0)], startup_window=0))
        sup.apply(config([replace(base, interval=3.0)], startup_window=0))
        sup.apply(config([], startup_window=0))
        sup.apply(config([replace(base, interval=4.0)], startup_window=0))
        sup.apply(config([replace(base, name="renamed")], startup_window=0))
        await asyncio.sleep(0.05)
        assert boxes.most["mail.test"] == 1 and len(boxes.polls) == 1
        boxes.gate.set()
        await until(lambda: "renamed" in boxes.polls)
        assert boxes.most["mail.test"] == 1, "two pollers worked one mailbox at once"
        assert set(sup.last) == {"renamed"}, "outcomes of replaced tasks do not come back"
    assert await state.seen("renamed", "", 0) == {"uid-1"}
    assert await state.seen("a", "", 0) == set()


async def test_no_account_starts_once_stopping_and_usr1_leaves_parked_ones(state: State) -> None:
    clock, boxes = Clock(), Mailboxes()
    clock.hold = True
    boxes.errors["parked"] = [PermanentError("bad password")]
    sup = Supervisor(
        config([acct("parked"), acct("fine")], startup_window=0),
        state,
        wait=clock.wait,
        poll=boxes.poll,
    )
    task = asyncio.create_task(sup.run(grace=30))
    await until(lambda: len(boxes.polls) == 2)
    sup.poll_now()
    await until(lambda: len(boxes.polls) == 3)
    await asyncio.sleep(0.05)
    assert boxes.polls.count("parked") == 1, "SIGUSR1 does not retry a wrong password"
    sup.stop.set()
    changes = sup.apply(config([acct("parked"), acct("fine"), acct("late")], startup_window=0))
    assert changes.added == []
    async with asyncio.timeout(5):  # far less than the grace: nothing was left running
        await task
    assert "late" not in boxes.polls
