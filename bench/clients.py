"""The three clients and how each is run and measured.

Every client runs as a child process, reaped with ``os.wait4`` so that its own CPU time comes
from the kernel (``struct rusage``); its peak RSS is VmHWM from /proc, read every 20 ms while it
runs. The sink keeps running in the benchmark's event loop meanwhile. Dovecot's CPU time is read
from /proc before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.server import BenchServer, Mailbox, process_memory

REPO = Path(__file__).resolve().parent.parent
PORT_KEY = {"imap": "imaps", "pop3": "pop3s"}


@dataclass
class Measured:
    wall: float
    user: float
    system: float
    peak_rss_mb: float
    returncode: int
    server_cpu: float
    sink_cpu: float  # the benchmark process itself: mostly the sink

    @property
    def cpu(self) -> float:
        return self.user + self.system


@dataclass
class Run:
    """One client's run of one scenario, as reported."""

    scenario: str
    protocol: str
    client: str
    accounts: int
    per_account: int
    messages: int
    bytes: int
    wall: float
    cpu_user: float
    cpu_system: float
    peak_rss_mb: float
    server_cpu: float
    sink_cpu: float
    received: int
    ok: bool
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_system

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.wall if self.wall else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.wall if self.wall else 0.0

    @property
    def cpu_ms_per_msg(self) -> float:
        return 1000 * self.cpu / self.messages if self.messages else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(
            cpu=self.cpu,
            msgs_per_s=self.msgs_per_s,
            mb_per_s=self.mb_per_s,
            cpu_ms_per_msg=self.cpu_ms_per_msg,
        )
        return d


async def measure(
    argv: list[str],
    *,
    server: BenchServer,
    log: Path,
    timeout: float,  # noqa: ASYNC109 - the child is killed, not just abandoned
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Measured:
    """Run ``argv`` to completion (killed after ``timeout``), stdout and stderr to ``log``."""
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    server_before = server.cpu_seconds()
    with open(log, "wb") as out:  # noqa: ASYNC230 - a quick local open
        started = time.monotonic()
        proc = subprocess.Popen(  # noqa: ASYNC220 - reaped by os.wait4 for its rusage
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd
        )
    reaped = asyncio.ensure_future(asyncio.to_thread(os.wait4, proc.pid, 0))
    # Peak RSS from VmHWM, read while it runs: rusage's ru_maxrss would count the benchmark's
    # own RSS, which the child inherits at fork and Linux keeps across exec.
    peak = 0.0
    deadline = started + timeout
    while not reaped.done() and time.monotonic() < deadline:
        peak = max(peak, process_memory(proc.pid).get("VmHWM", 0.0))
        await asyncio.wait({reaped}, timeout=0.02)
    timed_out = not reaped.done()
    if timed_out:
        proc.kill()
    try:
        _, status, usage = await reaped
    except BaseException:
        proc.kill()
        raise
    wall = time.monotonic() - started
    proc.returncode = -1 if timed_out else os.waitstatus_to_exitcode(status)
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    return Measured(
        wall=wall,
        user=usage.ru_utime,
        system=usage.ru_stime,
        peak_rss_mb=peak,
        returncode=proc.returncode,
        server_cpu=server.cpu_seconds() - server_before,
        sink_cpu=(self_after.ru_utime + self_after.ru_stime)
        - (self_before.ru_utime + self_before.ru_stime),
    )


# -- fetchd ------------------------------------------------------------------------------------


def fetchd_account(
    server: BenchServer,
    box: Mailbox,
    protocol: str,
    sink_port: int,
    **extra: Any,
) -> dict[str, Any]:
    account: dict[str, Any] = {
        "name": f"{box.user}-{protocol}",
        "protocol": protocol,
        "host": "localhost",
        "port": server.ports[PORT_KEY[protocol]],
        "user": box.user,
        "password": box.password,
        "tls": {"mode": "implicit", "ca_file": str(server.ca_file)},
        "deliver": {"smtp": f"127.0.0.1:{sink_port}", "to": [f"{box.user}@localhost"]},
    }
    account.update(extra)
    return account


def write_fetchd_config(directory: Path, accounts: list[dict[str, Any]], **top: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fetchd.yaml"
    state = directory / "state.sqlite3"
    for stale in directory.glob("state.sqlite3*"):
        stale.unlink()
    doc = {"state_file": str(state), "startup_window": 0, **top, "accounts": accounts}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.chmod(path, 0o600)
    return path


def fetchd_argv(config: Path, command: str = "once") -> list[str]:
    return [sys.executable, "-m", "fetchd", command, "-c", str(config)]


def fetchd_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# -- fetchmail ---------------------------------------------------------------------------------


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_fetchmail_rc(
    directory: Path, server: BenchServer, boxes: list[Mailbox], protocol: str, sink_port: int
) -> Path:
    """One poll entry, one user clause per mailbox, with TLS verified like fetchd's."""
    directory.mkdir(parents=True, exist_ok=True)
    port = server.ports[PORT_KEY[protocol]]
    lines = [
        "set no syslog",
        f"poll localhost with proto {protocol.upper()} port {port} timeout 60",
    ]
    for box in boxes:
        lines.append(
            f"  user {_q(box.user)} there with password {_q(box.password)} is {_q(box.user)} here"
            f" options ssl sslcertck sslcertfile {_q(str(server.ca_file))}"
            f" sslcommonname localhost nokeep fetchall no rewrite"
            f" smtphost {_q(f'127.0.0.1/{sink_port}')}"
        )
    rc = directory / "fetchmailrc"
    rc.write_text("\n".join(lines) + "\n")
    os.chmod(rc, 0o600)
    return rc


def fetchmail_argv(rc: Path, home: Path) -> list[str]:
    return [
        "fetchmail",
        "--nosyslog",
        "-d0",
        "-f",
        str(rc),
        "--pidfile",
        str(home / "fetchmail.pid"),
        "-i",
        str(home / "fetchids"),
    ]


def fetchmail_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HOME=str(home), FETCHMAILHOME=str(home), LC_ALL="C")
    return env


# -- the ceiling -------------------------------------------------------------------------------


def write_ceiling_spec(
    directory: Path,
    server: BenchServer,
    boxes: list[Mailbox],
    protocol: str,
    concurrency: int,
    mode: str = "all",
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    spec = {
        "protocol": protocol,
        "host": "localhost",
        "server_name": "localhost",
        "port": server.ports[PORT_KEY[protocol]],
        "ca_file": str(server.ca_file),
        "concurrency": concurrency,
        "mode": mode,
        "accounts": [[b.user, b.password] for b in boxes],
    }
    path = directory / "ceiling.json"
    path.write_text(json.dumps(spec))
    os.chmod(path, 0o600)
    return path


def ceiling_argv(spec: Path) -> list[str]:
    return [sys.executable, "-m", "bench.ceiling", str(spec)]


def terminate(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
