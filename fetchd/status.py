"""`fetchd status` and `fetchd health`: read the state, never write it."""

from __future__ import annotations

import os
import sys
import time

from fetchd.errors import ConfigError
from fetchd.state import AccountStatus, DaemonStatus, snapshot

STALE = 90.0  # seconds without a heartbeat after which the daemon counts as dead


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "never"
    seconds = max(0, int(now - when))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 172800:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def _alive(daemon: DaemonStatus | None, now: float) -> tuple[bool, str]:
    if daemon is None:
        return False, "no fetchd daemon is running with this state file"
    try:
        os.kill(daemon.pid, 0)
    except ProcessLookupError:
        return False, f"fetchd (pid {daemon.pid}) is gone without saying so (crashed?)"
    except PermissionError:
        pass  # alive, but another user's
    beat = now - daemon.heartbeat
    if beat > STALE:
        return False, f"fetchd (pid {daemon.pid}) has not beaten for {beat:.0f} s (hung?)"
    return True, f"fetchd (pid {daemon.pid}) running since {_ago(daemon.started, now)}"


def health(state_file: str) -> int:
    """0 when the daemon working on this state file is alive (for HEALTHCHECK and probes)."""
    try:
        daemon, _ = snapshot(state_file)
    except ConfigError as e:
        print(f"unhealthy: {e}")
        return 1
    ok, text = _alive(daemon, time.time())
    print(("ok: " if ok else "unhealthy: ") + text)
    return 0 if ok else 1


def status(state_file: str, names: list[str] | None, problem: str | None = None) -> int:
    """A table: one line per account (``names``, or all the state knows when the configuration
    cannot be read: ``problem`` says why), then the problems in full."""
    try:
        daemon, accounts = snapshot(state_file)
    except ConfigError as e:
        print(f"fetchd: {e}", file=sys.stderr)
        return 1
    now = time.time()
    _, text = _alive(daemon, now)
    print(text)
    if daemon is not None and daemon.reload_error:
        error = _cut(daemon.reload_error, 500)
        print(f"last reload FAILED (the previous configuration runs): {error}")
    if problem is not None:
        print(f"configuration error (showing what the state knows): {_cut(problem, 500)}")
    rows = [("ACCOUNT", "LAST POLL", "RESULT", "LAST OK", "KEPT", "SUMMARY / ERROR")]
    problems: list[str] = []
    for name in sorted(accounts) if names is None else names:
        s = accounts.get(name)
        if s is None or s.ok is None:
            rows.append((name, "never", "-", "never", _kept(s), ""))
            continue
        result = "ok" if s.ok else "FAILED"
        detail = s.summary if s.ok else (s.error or "")
        rows.append((name, _ago(s.started, now), result, _ago(s.last_ok, now), _kept(s), detail))
        problems += [f"{name}: {r}" for r in s.reasons]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        cells = [r[i].ljust(widths[i]) for i in range(5)]
        print("  ".join([*cells, _cut(r[5], 100)]).rstrip())
    if problems:
        print(
            "\nkept on the server (refused by the MTA, held after it went silent, "
            "or sent broken by the server):"
        )
        for line in problems:
            print(f"  {_cut(line, 300)}")
        print("once the cause is dealt with, `fetchd release ACCOUNT` has them fetched again")
    return 0


def _kept(s: AccountStatus | None) -> str:
    if s is None or not (s.refused or s.held or s.broken):
        return "-"
    parts = [f"{s.refused}"] if s.refused else []
    parts += [f"{s.held} held"] if s.held else []
    parts += [f"{s.broken} broken"] if s.broken else []
    return "+".join(parts)


def _cut(text: str, limit: int) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
