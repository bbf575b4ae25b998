"""The project's test Dovecot, filled for a benchmark, and its CPU use read from /proc.

The Dovecot is the one the tests use (tests/support/dovecot.py), started with a trustme CA like
the test fixture. The benchmark adds a few settings through its ``extra_config`` hook (Dovecot
merges a repeated ``service`` block into the first one):

- ``service imap-login/pop3-login { process_min_avail = <cores> }``: with ``service_count = 0``
  one login process proxies the TLS of many sessions; without this, all TLS of a benchmark could
  land in a single process and be capped at one core.
- for the IDLE scenario, ``service imap { service_count = 0, client_limit = N }``: one imap
  process per N sessions instead of one per session, because each imap process takes an
  inotify instance and the kernel allows 128 per user by default (fs.inotify.
  max_user_instances); processes over that limit fall back to polling the mailbox every 30 s,
  which would be measured as push latency.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trustme

from bench.mail import Message
from tests.support.dovecot import Dovecot, mail_owner, running_dovecot

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Mailbox:
    user: str
    password: str


def bench_config(*, idle_client_limit: int = 0) -> str:
    cores = os.cpu_count() or 2
    extra = (
        f"service imap-login {{\n  process_min_avail = {cores}\n}}\n"
        f"service pop3-login {{\n  process_min_avail = {cores}\n}}\n"
    )
    if idle_client_limit > 1:
        extra += (
            "service imap {\n  service_count = 0\n"
            f"  client_limit = {idle_client_limit}\n  process_limit = 2000\n}}\n"
        )
    return extra


class BenchServer:
    """A running Dovecot with a CA file the clients trust."""

    def __init__(self, dovecot: Dovecot, ca_file: Path) -> None:
        self.dovecot = dovecot
        self.ca_file = ca_file
        self.mailboxes: list[Mailbox] = []

    @property
    def ports(self) -> dict[str, int]:
        return self.dovecot.ports

    def add_mailboxes(self, count: int, prefix: str = "bench") -> list[Mailbox]:
        boxes = [Mailbox(f"{prefix}{i}", f"pw-{prefix}{i}-secret") for i in range(count)]
        for box in boxes:
            self.dovecot.add_user(box.user, box.password)
        self.mailboxes = boxes
        return boxes

    def clear(self, boxes: Iterable[Mailbox]) -> None:
        """Remove every message file (what a failed run left behind)."""
        for box in boxes:
            for sub in ("cur", "new", "tmp"):
                folder = self.dovecot.maildir(box.user) / sub
                for entry in os.scandir(folder):
                    os.unlink(entry.path)

    def load(
        self, boxes: list[Mailbox], messages: Callable[[int, Mailbox], Iterable[Message]]
    ) -> tuple[int, int]:
        """Empty the mailboxes, write each one's messages straight into its Maildir, and let
        Dovecot index them. Returns (messages, bytes as served)."""
        uid, gid, _ = mail_owner()
        self.clear(boxes)
        count = nbytes = 0
        stamp = time.time_ns()  # never a file name Dovecot has seen (and expunged) before
        for i, box in enumerate(boxes):
            target = self.dovecot.maildir(box.user) / "new"
            for n, message in enumerate(messages(i, box)):
                # Sizes in the name, as Dovecot's own delivery writes them: RFC822.SIZE is
                # then known without reading the file.
                name = f"{stamp // 10**9}.M{stamp % 10**9}N{n}P{i}.bench"
                size = f",S={len(message.data)},W={message.served_size}"
                path = target / (name + size)
                path.write_bytes(message.data)
                os.chown(path, uid, gid)
                count += 1
                nbytes += message.served_size
        found = self.counts(boxes)
        if sum(found.values()) != count:
            raise RuntimeError(f"Dovecot indexed {sum(found.values())} messages, not {count}")
        return count, nbytes

    def counts(self, boxes: list[Mailbox]) -> dict[str, int]:
        """Messages in each INBOX, with one doveadm run for all mailboxes (also indexes them)."""
        users = self.dovecot.root / "bench-users.txt"
        users.write_text("".join(f"{b.user}\n" for b in boxes))
        out = self.dovecot.doveadm(
            "-f", "tab", "mailbox", "status", "-F", str(users), "messages", "INBOX"
        )
        found: dict[str, int] = {}
        for line in out.splitlines()[1:]:
            user, _, messages = line.split("\t")
            found[user] = int(messages)
        return found

    def master_pid(self) -> int:
        return int((self.dovecot.root / "run" / "master.pid").read_text().strip())

    def cpu_seconds(self) -> float:
        """CPU time of this Dovecot so far: the master, its live processes, and (through the
        master's cutime/cstime) every process it has reaped."""
        return tree_cpu_seconds(self.master_pid())

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.dovecot.log().splitlines()[-lines:])


def _stat(pid: str) -> tuple[int, float] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    ppid = int(fields[1])
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ppid, ticks / CLOCK_TICKS


def tree_cpu_seconds(root: int) -> float:
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        found = _stat(entry)
        if found is None:
            continue
        ppid, seconds = found
        pid = int(entry)
        cpu[pid] = seconds
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def process_memory(pid: int) -> dict[str, float]:
    """VmHWM (peak RSS) and VmRSS of a running process, in MB."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) / 1024
    return out


def process_cpu(pid: int) -> float:
    found = _stat(str(pid))
    return found[1] if found else 0.0


@contextlib.contextmanager
def bench_server(workdir: Path, *, idle_client_limit: int = 0) -> Iterator[BenchServer]:
    ca = trustme.CA()
    # A common name as well as the SANs: fetchmail refuses a certificate without one.
    leaf = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    chain = b"".join(p.bytes() for p in leaf.cert_chain_pems)
    ca_file = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    os.chmod(ca_file, 0o644)
    extra = bench_config(idle_client_limit=idle_client_limit)
    with running_dovecot(chain, leaf.private_key_pem.bytes(), extra) as dovecot:
        server = BenchServer(dovecot, ca_file)
        try:
            yield server
        finally:
            log = dovecot.log()
            if log:  # kept for the report: warnings about limits, errors
                shutil.copyfile(dovecot.log_path, workdir / "dovecot.log")


def require_programs(names: Iterable[str]) -> list[str]:
    return [n for n in names if shutil.which(n) is None]


def doveadm_version() -> str:
    result = subprocess.run(["dovecot", "--version"], capture_output=True, text=True, check=False)
    return result.stdout.strip()
