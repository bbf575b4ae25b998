"""Runs the pollers: every account at once, each in its own task, none able to hurt another.

An account task never lets an exception escape: it is classified, logged once with the account
named, and decides when the account is polled next (its interval, a back-off after temporary
errors, a long pause after permanent ones). Cancellation always propagates.

A reload (:meth:`Supervisor.apply`) compares the new accounts with the running ones by value:
new ones start, removed ones finish the message in hand and stop, changed ones do both, and
unchanged ones are not touched, so their IDLE connections stay up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from fetchd import __version__
from fetchd.config import Account, Config
from fetchd.errors import ConfigError, FetchdError, NoIdle, PermanentError, TemporaryError
from fetchd.metrics import Metrics
from fetchd.poller import Poller, PollResult
from fetchd.state import State

log = logging.getLogger("fetchd")

PARKED_RETRY = 6 * 3600.0  # a permanent error is retried this rarely, in case it was fixed
BACKOFF_CAP = 3600.0


@dataclass(slots=True)
class Outcome:
    """How one poll of one account ended."""

    account: Account
    result: PollResult | None
    error: BaseException | None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def line(self) -> str:
        if self.error is None:
            assert self.result is not None
            return f"{self.account.name}: ok: {self.result.summary()}"
        return f"{self.account.name}: FAILED: {describe(self.account, self.error)}"


def describe(account: Account, error: BaseException) -> str:
    """The error in plain words, naming the account and host once."""
    text = str(error) or type(error).__name__
    where = f"account {account.where()}: "
    if text.startswith(where):
        text = text[len(where) :]
    if not isinstance(error, FetchdError):
        text = f"internal error: {type(error).__name__}: {text}"
    return f"{text} [{account.user} at {account.host}:{account.port}]"


def error_kind(error: BaseException) -> str:
    """What the daemon does about an error: the ``kind`` label of the error metric."""
    if isinstance(error, TemporaryError):
        return "temporary"
    if isinstance(error, PermanentError):
        return "permanent"
    if isinstance(error, ConfigError):
        return "config"
    return "internal"


def next_delay(interval: float, failures: int, permanent: bool, rand: float) -> float:
    """Seconds until the next poll. ``rand`` in [0, 1) spreads accounts apart (±10 %)."""
    if permanent:
        base = max(interval, PARKED_RETRY)
    elif failures:
        base = min(max(interval, BACKOFF_CAP), min(interval, 60.0) * 2 ** (failures - 1))
    else:
        base = interval
    return base * (0.9 + 0.2 * rand)


Wait = Callable[[float, Sequence[asyncio.Event]], Awaitable[None]]


async def wait_any(delay: float, events: Sequence[asyncio.Event]) -> None:
    """Sleep ``delay`` seconds, or less if one of ``events`` is set meanwhile."""
    if delay <= 0 or any(e.is_set() for e in events):
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


@dataclass(eq=False, slots=True)
class _Running:
    """The task of one account: its poll loop, or its IDLE loops (one per folder)."""

    account: Account
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] = field(init=False)


@dataclass(slots=True)
class Changes:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0

    def summary(self) -> str:
        parts = [f"{len(self.added)} added", f"{len(self.removed)} removed"]
        parts += [f"{len(self.changed)} changed", f"{self.unchanged} unchanged"]
        return ", ".join(parts)


class Supervisor:
    """Schedules the accounts. Time and randomness are injectable (``wait``, ``rand``)."""

    def __init__(
        self,
        config: Config,
        state: State,
        *,
        rand: Callable[[], float] = random.random,
        log_outcomes: bool = True,
        metrics: Metrics | None = None,
        wait: Wait = wait_any,
        poll: Callable[[Account, Callable[[], bool]], Awaitable[PollResult]] | None = None,
    ) -> None:
        self.config = config
        self.log_outcomes = log_outcomes
        self.state = state
        self.rand = rand
        self.metrics = metrics or Metrics()
        self.stop = asyncio.Event()
        self.last: dict[str, Outcome] = {}  # the latest outcome of each account
        self.idling: set[tuple[str, str]] = set()  # (account, folder) with IDLE up
        self._wait = wait
        self._poll = poll or self._real_poll
        self._connections = asyncio.Semaphore(config.max_connections)
        self._hosts: dict[str, asyncio.Semaphore] = {}
        self._running: dict[str, _Running] = {}
        self._draining: set[_Running] = set()  # removed or replaced, finishing their message
        self._tasks: set[asyncio.Task[None]] = set()
        self._group: asyncio.TaskGroup | None = None
        self._hurry = asyncio.Event()

    # -- one poll ---------------------------------------------------------------------------

    async def _real_poll(self, account: Account, stopping: Callable[[], bool]) -> PollResult:
        poller = Poller(account, self.state, stopping=stopping)
        try:
            return await poller.poll()
        except BaseException as e:
            setattr(e, "partial_result", poller.result)  # noqa: B010 - what it did before failing
            raise

    def _host_limit(self, account: Account) -> asyncio.Semaphore | None:
        limit = self.config.max_connections_per_host
        if not limit:
            return None
        key = account.host.lower()
        if key not in self._hosts:
            self._hosts[key] = asyncio.Semaphore(limit)
        return self._hosts[key]

    async def poll(self, account: Account, stopping: Callable[[], bool] | None = None) -> Outcome:
        """Poll one account once; never raises (except cancellation)."""
        stop = stopping or self.stop.is_set
        async with AsyncExitStack() as slots:
            # The host's slot first: waiting for it must not hold a global one.
            host = self._host_limit(account)
            if host is not None:
                await slots.enter_async_context(host)
            await slots.enter_async_context(self._connections)
            started = time.monotonic()
            try:
                result = await self._poll(account, stop)
            except FetchdError as e:
                outcome = Outcome(account, getattr(e, "partial_result", None), e)
            except Exception as e:  # a bug: logged with its traceback, siblings go on
                log.exception("account %s: unexpected error", account.name)
                outcome = Outcome(account, getattr(e, "partial_result", None), e)
            else:
                outcome = Outcome(account, result, None)
            outcome.seconds = time.monotonic() - started
        await self._record(outcome)
        if self.log_outcomes:  # `fetchd once` prints them instead
            level = logging.INFO if outcome.ok else logging.ERROR
            log.log(level, "%s", outcome.line(), extra={"account": account.name})
        return outcome

    async def _record(self, outcome: Outcome) -> None:
        """Metrics, the latest outcome, and a row in the state for `fetchd status`."""
        name = outcome.account.name
        if not self._current(outcome.account):
            return  # removed or replaced by a reload while it polled
        self.last[name] = outcome
        self._count(name, outcome.result)
        if outcome.error is not None:
            self.metrics.error(name, error_kind(outcome.error))
        self.metrics.poll_finished(name, outcome.seconds, outcome.ok)
        summary = outcome.result.summary() if outcome.result else ""
        error = None if outcome.error is None else describe(outcome.account, outcome.error)
        try:
            await self.state.record_poll(name, outcome.seconds, outcome.ok, summary, error)
        except Exception:  # status is a convenience; never let it stop the polling
            log.exception("account %s: cannot record the poll in the state", name)

    def _count(self, name: str, result: PollResult | None) -> None:
        if result is None:
            return
        self.metrics.fetched(name, result.fetched, result.bytes)
        self.metrics.delivered(name, result.delivered)
        self.metrics.refused(name, result.rejected + result.redirected + result.dropped)

    async def run_once(self) -> list[Outcome]:
        """Poll every account once, all at the same time."""
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self.poll(a)) for a in self.config.accounts]
        return [t.result() for t in tasks]

    # -- the daemon -------------------------------------------------------------------------

    async def run(self, grace: float = 30.0) -> None:
        """Poll every account at its interval until :attr:`stop` is set.

        On stop, pollers finish the message in hand and log out; after ``grace`` seconds, or
        at once after :meth:`hurry`, the rest is cancelled.
        """
        self.metrics.set_info(len(self.config.accounts), __version__)
        async with asyncio.TaskGroup() as tg:
            self._group = tg
            for account in self.config.accounts:
                self._start(account, self.config.startup_window * self.rand())
            await self.stop.wait()
            for running in (*self._running.values(), *self._draining):
                running.stop.set()
            if self._tasks:
                finished = asyncio.ensure_future(asyncio.wait(list(self._tasks)))
                hurry = asyncio.ensure_future(self._hurry.wait())
                await asyncio.wait(
                    [finished, hurry], timeout=grace, return_when=asyncio.FIRST_COMPLETED
                )
                finished.cancel()
                hurry.cancel()
            while self._tasks:  # whatever is left, including anything started meanwhile
                busy = list(self._tasks)
                log.warning("%d account task(s) still busy: cancelled", len(busy))
                for task in busy:
                    task.cancel()
                await asyncio.wait(busy)
        self._group = None

    def hurry(self) -> None:
        """A second SIGTERM: do not wait out the grace period."""
        self._hurry.set()

    def poll_now(self) -> None:
        """SIGUSR1: every account that waits for its next poll polls now, except those parked
        after a permanent error (a wrong password retried on every signal can lock an account;
        a reload retries them)."""
        for name, running in self._running.items():
            if not _parked(self.last.get(name)):
                running.wake.set()

    def apply(self, config: Config) -> Changes:
        """A reload: start, stop and restart accounts so the running set matches ``config``.

        A new task for an account never overlaps an old one for the same account or the same
        mailbox (a rename): it starts once they have finished the message in hand.
        """
        changes = Changes()
        if self.stop.is_set():
            return changes
        old = {a.name: a for a in self.config.accounts}
        new = {a.name: a for a in config.accounts}
        changes.added = [n for n in new if n not in old]
        changes.removed = [n for n in old if n not in new]
        changes.changed = [n for n in new if n in old and new[n] != old[n]]
        changes.unchanged = len(new) - len(changes.added) - len(changes.changed)
        if config.state_file != self.config.state_file:
            log.warning("state_file changed to %s: that takes a restart", config.state_file)
        if config.http_listen != self.config.http_listen:
            log.warning("http.listen changed: that takes a restart")
        if config.max_connections != self.config.max_connections:
            self._connections = asyncio.Semaphore(config.max_connections)
        if config.max_connections_per_host != self.config.max_connections_per_host:
            self._hosts = {}
        self.config = config
        self.metrics.set_info(len(config.accounts), __version__)
        gone = {name: old[name] for name in changes.removed}
        for name in changes.removed + changes.changed:
            running = self._running.pop(name)
            running.stop.set()  # the message in hand is finished, then the task ends
            self._draining.add(running)
            running.task.add_done_callback(functools.partial(self._drained, running))
        for name in changes.removed:
            self.last.pop(name, None)
            self.metrics.forget(name)
            self.idling = {k for k in self.idling if k[0] != name}
        for name in changes.added:
            account = new[name]
            renamed = [g for g in gone.values() if _mailbox(g) == _mailbox(account)]
            self._start(account, 0.0, renamed[0].name if len(renamed) == 1 else None)
        for name in changes.changed:
            self._start(new[name], 0.0)
        for name, running in self._running.items():
            if _parked(self.last.get(name)):
                running.wake.set()  # parked until a reload: perhaps its password file was fixed
        return changes

    def _drained(self, running: _Running, task: asyncio.Task[None]) -> None:
        self._draining.discard(running)

    def _start(self, account: Account, first_delay: float, renamed_from: str | None = None) -> None:
        """One task per account; it first waits for older tasks of the same account or
        mailbox, still finishing the message in hand."""
        assert self._group is not None
        if self.stop.is_set():
            return
        before = [
            r.task
            for r in self._draining
            if r.account.name == account.name or _mailbox(r.account) == _mailbox(account)
        ]
        running = _Running(account)
        self._running[account.name] = running
        running.task = self._group.create_task(
            self._lifecycle(running, before, first_delay, renamed_from)
        )
        self._tasks.add(running.task)
        running.task.add_done_callback(self._tasks.discard)

    async def _lifecycle(
        self,
        running: _Running,
        before: list[asyncio.Task[None]],
        first_delay: float,
        renamed_from: str | None,
    ) -> None:
        if before:
            await asyncio.wait(before)
        if running.stop.is_set():
            return
        a = running.account
        if renamed_from is not None:
            # The same mailbox under a new name: carry its state over, or it is fetched again.
            log.info("account %s was %s: its state moves with it", a.name, renamed_from)
            await self.state.rename_account(renamed_from, a.name)
        if not (a.idle and a.protocol == "imap"):
            await self._account_loop(running, first_delay)
            return
        async with asyncio.TaskGroup() as tg:
            for folder in a.folders:
                tg.create_task(self._idle_loop(running, folder, first_delay))

    def _current(self, account: Account) -> bool:
        """Whether outcomes of this account still count (not removed or replaced meanwhile)."""
        if self._group is None:  # `fetchd once`
            return True
        running = self._running.get(account.name)
        return running is not None and running.account is account

    async def _pause(self, running: _Running, delay: float) -> None:
        await self._wait(delay, (running.stop, running.wake))
        running.wake.clear()

    async def _account_loop(self, running: _Running, first_delay: float) -> None:
        account, failures = running.account, 0
        await self._pause(running, first_delay)
        while not running.stop.is_set():
            outcome = await self.poll(account, running.stop.is_set)
            failures = 0 if outcome.ok else failures + 1
            permanent = isinstance(outcome.error, PermanentError | ConfigError)
            delay = next_delay(account.interval, failures, permanent, self.rand())
            if not outcome.ok:
                log.info(
                    "account %s: next attempt in %.0f s",
                    account.name,
                    delay,
                    extra={"account": account.name},
                )
            await self._pause(running, delay)

    async def _idle_loop(self, running: _Running, folder: str, first_delay: float) -> None:
        """One IDLE connection per watched folder, re-established with back-off."""
        account, failures = running.account, 0
        await self._pause(running, first_delay)
        while not running.stop.is_set():
            poller = Poller(account, self.state, stopping=running.stop.is_set)
            started = time.monotonic()

            async def report(result: PollResult | None, folder: str = folder) -> None:
                key = (account.name, folder)
                if not self._current(account):
                    return
                self.metrics.idle(account.name, folder, result is not None)
                if result is None:
                    self.idling.discard(key)
                    return
                self.idling.add(key)
                self._count(account.name, result)
                self.last[account.name] = Outcome(account, result, None)
                summary = f"IDLE on {folder}: {result.summary()}"
                try:
                    await self.state.record_poll(account.name, 0.0, True, summary, None)
                except Exception:
                    log.exception("account %s: cannot record the poll in the state", account.name)

            try:
                await poller.watch(folder, running.stop, report=report)
                failures = 0
                delay = 0.0
            except NoIdle as e:  # fall back to polling this folder at the interval
                log.info("%s", e, extra={"account": account.name})
                failures = 0
                delay = next_delay(account.interval, 0, False, self.rand())
            except FetchdError as e:
                failures += 1
                permanent = isinstance(e, PermanentError | ConfigError)
                delay = next_delay(min(account.interval, 60.0), failures, permanent, self.rand())
                level = logging.ERROR if permanent or failures > 1 else logging.WARNING
                log.log(
                    level,
                    "%s: %s (IDLE %s again in %.0f s)",
                    account.name,
                    describe(account, e),
                    folder,
                    delay,
                    extra={"account": account.name},
                )
                outcome = Outcome(account, poller.result, e, time.monotonic() - started)
                await self._record(outcome)
            except Exception as e:
                failures += 1
                delay = next_delay(60.0, failures, False, self.rand())
                log.exception(
                    "account %s: unexpected error while idling on %s", account.name, folder
                )
                await self._record(Outcome(account, poller.result, e))
            await self._pause(running, delay)

    def counts(self) -> str:
        """For systemd's STATUS= line: how many accounts, failing and idling."""
        failing = sum(1 for o in self.last.values() if not o.ok)
        idle = len({name for name, _ in self.idling})
        total = len(self.config.accounts)
        return f"{total} accounts, {failing} failing, {idle} idling"


def _parked(outcome: Outcome | None) -> bool:
    return outcome is not None and isinstance(outcome.error, PermanentError | ConfigError)


def _mailbox(account: Account) -> tuple[str, str, int, str]:
    return (account.protocol, account.host.lower(), account.port, account.user)
