"""Runs the pollers: every account at once, each in its own task, none able to hurt another.

An account task never lets an exception escape: it is classified, logged once with the account
named, and decides when the account is polled next (its interval, a back-off after temporary
errors, a long pause after permanent ones). Cancellation always propagates.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from fetchd.config import Account, Config
from fetchd.errors import ConfigError, FetchdError, NoIdle, PermanentError
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


def next_delay(interval: float, failures: int, permanent: bool, rand: float) -> float:
    """Seconds until the next poll. ``rand`` in [0, 1) spreads accounts apart (±10 %)."""
    if permanent:
        base = max(interval, PARKED_RETRY)
    elif failures:
        base = min(max(interval, BACKOFF_CAP), min(interval, 60.0) * 2 ** (failures - 1))
    else:
        base = interval
    return base * (0.9 + 0.2 * rand)


class Supervisor:
    def __init__(
        self,
        config: Config,
        state: State,
        *,
        rand: Callable[[], float] = random.random,
        log_outcomes: bool = True,
    ) -> None:
        self.config = config
        self.log_outcomes = log_outcomes
        self.state = state
        self.rand = rand
        self.stop = asyncio.Event()
        self._connections = asyncio.Semaphore(config.max_connections)

    async def poll(self, account: Account) -> Outcome:
        """Poll one account once; never raises (except cancellation)."""
        async with self._connections:
            poller = Poller(account, self.state, stopping=self.stop.is_set)
            try:
                result = await poller.poll()
            except FetchdError as e:
                outcome = Outcome(account, poller.result, e)
            except Exception as e:  # a bug: logged with its traceback, siblings go on
                log.exception("account %s: unexpected error", account.name)
                outcome = Outcome(account, poller.result, e)
            else:
                outcome = Outcome(account, result, None)
        if self.log_outcomes:  # `fetchd once` prints them instead
            log.log(logging.INFO if outcome.ok else logging.ERROR, "%s", outcome.line())
        return outcome

    async def run_once(self) -> list[Outcome]:
        """Poll every account once, all at the same time."""
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self.poll(a)) for a in self.config.accounts]
        return [t.result() for t in tasks]

    async def run(self, grace: float = 30.0) -> None:
        """Poll every account at its interval until :attr:`stop` is set.

        On stop, pollers finish the message in hand; after ``grace`` seconds the rest is
        cancelled.
        """
        tasks = []
        for a in self.config.accounts:
            if a.idle and a.protocol == "imap":
                tasks += [asyncio.create_task(self._idle_loop(a, f)) for f in a.folders]
            else:
                tasks.append(asyncio.create_task(self._account_loop(a)))
        try:
            await self.stop.wait()
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _idle_loop(self, account: Account, folder: str) -> None:
        """One IDLE connection per watched folder, re-established with back-off."""
        failures = 0
        while not self.stop.is_set():
            poller = Poller(account, self.state, stopping=self.stop.is_set)
            try:
                await poller.watch(folder, self.stop)
                failures = 0
                delay = 0.0
            except NoIdle as e:  # fall back to polling this folder at the interval
                log.info("%s", e)
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
                )
            except Exception:
                failures += 1
                delay = next_delay(60.0, failures, False, self.rand())
                log.exception(
                    "account %s: unexpected error while idling on %s", account.name, folder
                )
            if delay:
                try:
                    async with asyncio.timeout(delay):
                        await self.stop.wait()
                except TimeoutError:
                    pass

    async def _account_loop(self, account: Account) -> None:
        failures = 0
        while not self.stop.is_set():
            outcome = await self.poll(account)
            failures = 0 if outcome.ok else failures + 1
            permanent = isinstance(outcome.error, PermanentError | ConfigError)
            delay = next_delay(account.interval, failures, permanent, self.rand())
            if not outcome.ok:
                log.info("account %s: next attempt in %.0f s", account.name, delay)
            try:
                async with asyncio.timeout(delay):
                    await self.stop.wait()
            except TimeoutError:
                pass
