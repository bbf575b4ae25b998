"""`fetchd run`: the daemon's lifecycle around the supervisor.

Start: lock and open the state, start the optional HTTP listener, tell systemd READY=1.
SIGHUP re-reads the whole configuration; a broken file changes nothing (the error is logged,
kept in the state for `fetchd status`, and shown in systemd's STATUS=), a good one is applied as
a difference. SIGUSR1 polls every account now. SIGTERM/SIGINT stop gracefully. A heartbeat in
the state lets `fetchd health` tell a live daemon from a dead one.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from fetchd import __version__
from fetchd.config import Config
from fetchd.errors import ConfigError
from fetchd.metrics import Metrics, serve
from fetchd.notify import Notifier
from fetchd.state import State
from fetchd.supervisor import Supervisor

log = logging.getLogger("fetchd")

HEARTBEAT = 30.0  # seconds; `fetchd health` calls a daemon dead after three missed beats


class Daemon:
    def __init__(
        self,
        config: Config,
        load: Callable[[str], Config],
        *,
        notifier: Notifier | None = None,
        grace: float = 30.0,
    ) -> None:
        self.config = config
        self._load = load
        self.notifier = notifier or Notifier()
        self.grace = grace
        self.reload_error: str | None = None
        self.supervisor: Supervisor | None = None
        self.state: State | None = None
        self._reloader: asyncio.Task[None] | None = None
        self._reload_again = False

    async def run(self) -> None:
        state = self.state = await State.open(self.config.state_file, lock=True)
        metrics = Metrics()
        supervisor = self.supervisor = Supervisor(self.config, state, metrics=metrics)
        loop = asyncio.get_running_loop()
        server = None
        background: list[asyncio.Task[None]] = []
        handlers = {
            signal.SIGTERM: self._stop,
            signal.SIGINT: self._stop,
            signal.SIGHUP: self._hup,
            signal.SIGUSR1: self._poll_now,
        }
        try:
            if self.config.http_listen:
                host, port = self.config.http_listen
                try:
                    server = await serve(metrics, host, port, self._health)
                except OSError as e:
                    raise ConfigError(
                        f"{self.config.path}: http.listen {host}:{port}: {e.strerror}"
                    ) from None
                log.info("metrics and /healthz on http://%s:%d/", host, port)
            await state.daemon_alive(
                self.config.path, len(self.config.accounts), None, started=True
            )
            for sig, handler in handlers.items():
                loop.add_signal_handler(sig, handler)
            background.append(loop.create_task(self._heartbeat()))
            log.info("fetchd %s running with %d account(s)", __version__, len(self.config.accounts))
            self.notifier.ready(supervisor.counts())
            await supervisor.run(grace=self.grace)
        finally:
            for sig in handlers:
                loop.remove_signal_handler(sig)
            if self._reloader is not None:
                background.append(self._reloader)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if server is not None:
                server.close()
                await server.wait_closed()
            try:
                await state.daemon_stopped()
            finally:
                await state.close()
                self.notifier.close()
        log.info("fetchd stopped")

    def _stop(self) -> None:
        if self.supervisor is None:
            return
        if self.supervisor.stop.is_set():
            log.warning("stopping now: the messages in hand are left on the server")
            self.supervisor.hurry()
            return
        log.info("stopping: finishing the messages in hand (at most %.0f s)", self.grace)
        self.notifier.stopping()
        self.supervisor.stop.set()

    def _hup(self) -> None:
        """Reloads run one at a time, in order; HUPs that arrive meanwhile make one more."""
        if self._reloader is not None and not self._reloader.done():
            self._reload_again = True
            return
        self._reloader = asyncio.get_running_loop().create_task(self._reloads())

    async def _reloads(self) -> None:
        while True:
            self._reload_again = False
            await self.reload()
            if not self._reload_again:
                return

    def _poll_now(self) -> None:
        log.info("SIGUSR1: polling every account now")
        if self.supervisor is not None:
            self.supervisor.poll_now()

    async def reload(self) -> None:
        """SIGHUP: apply a valid configuration's difference; keep everything on an invalid one."""
        assert self.supervisor is not None
        if self.supervisor.stop.is_set():
            return
        self.notifier.reloading()
        path = self.config.path
        try:
            new = await asyncio.to_thread(self._load, path)
        except ConfigError as e:
            self.reload_error = str(e)
            log.error("reload failed, the running configuration stays: %s", e)
        except Exception as e:  # e.g. a CA file that does not parse: still keep running
            self.reload_error = f"{path}: {type(e).__name__}: {e}"
            log.exception("reload failed, the running configuration stays")
        else:
            self.reload_error = None
            changes = self.supervisor.apply(new)
            self.config = new
            log.info("reloaded %s: %s", path, changes.summary())
        self.notifier.ready(self._status())
        await self._beat()

    def _status(self) -> str:
        assert self.supervisor is not None
        text = self.supervisor.counts()
        if self.reload_error:
            text += f"; last reload failed: {self.reload_error}"
        return text[:400]

    def _health(self) -> tuple[bool, str]:
        if self.supervisor is None or self.supervisor.stop.is_set():
            return False, "stopping"
        return True, self._status()

    async def _beat(self) -> None:
        assert self.state is not None
        try:
            await self.state.daemon_alive(
                self.config.path, len(self.config.accounts), self.reload_error
            )
        except Exception:
            log.exception("cannot write the heartbeat to the state")

    async def _heartbeat(self) -> None:
        """The state's heartbeat, systemd's STATUS= and its watchdog."""
        interval = HEARTBEAT
        if self.notifier.watchdog:
            interval = min(interval, max(self.notifier.watchdog, 0.5))
        beats = 0.0
        while True:
            self.notifier.ping()
            if beats <= 0:
                await self._beat()
                self.notifier.status(self._status())
                beats = HEARTBEAT
            await asyncio.sleep(interval)
            beats -= interval
