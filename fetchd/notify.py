"""systemd's notify protocol (sd_notify), without libsystemd: one datagram per state change.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET``; fetchd says READY=1 once the
configuration and the state are loaded, RELOADING=1/READY=1 around a reload, STOPPING=1, a
STATUS= line, and WATCHDOG=1 every half ``WatchdogSec`` while the event loop is alive.
Anywhere else it does nothing. Failures to notify are never fatal.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("fetchd")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # Linux abstract namespace
            address = "\0" + address[1:]
        self.address = address if address.startswith(("/", "\0")) else ""
        self.watchdog: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 1e6 / 2  # ping twice per period
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        clean = ("".join(c if c.isprintable() else " " for c in f) for f in fields)
        message = "\n".join(clean).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
        except OSError as e:
            log.debug("cannot notify systemd at %r: %s", self.address, e)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def ping(self) -> None:
        if self.watchdog:
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
