"""Profiling fetchd with py-spy, and reading its collapsed stacks.

``py-spy record --idle --format raw`` samples every thread, waiting or not. The main thread's
samples split into the event loop waiting in ``select`` (idle: the process waits for a server
or the sink) and busy ones; the busy ones are ranked by the function on top of the stack (self
time) and by every fetchd function on the stack (inclusive time). Shares are of all main-thread
samples, i.e. of wall time.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.clients import REPO

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _is_idle_leaf(func: str, file: str) -> bool:
    """The event loop waiting for I/O (EpollSelector.select, or a bare select)."""
    return file.endswith("selectors.py") and func.rsplit(".", 1)[-1] in ("select", "poll")


def py_spy() -> str | None:
    local = REPO / "bench" / ".venv" / "bin" / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def record_argv(pyspy: str, output: Path, target: list[str], rate: int = 250) -> list[str]:
    return [
        pyspy,
        "record",
        "--idle",
        "--nonblocking",
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        str(output),
        "--",
        *target,
    ]


def _short(path: str) -> str:
    """fetchd/imap.py, aioimaplib/aioimaplib.py, asyncio/sslproto.py ... not a full path."""
    path = path.replace("\\", "/")
    if not path.startswith("/"):
        return path  # py-spy already shortened it
    for marker in ("/site-packages/", "/lib/python3.11/", "/lib/python3.12/"):
        if marker in path:
            return path.split(marker, 1)[1]
    if "/fetchd/" in path:
        return "fetchd/" + path.rsplit("/fetchd/", 1)[1]
    return "/".join(path.split("/")[-2:])


@dataclass
class Profile:
    samples: int = 0  # main thread
    idle: int = 0
    other_threads: int = 0
    other_busy: int = 0  # the SQLite worker thread running a query, not waiting for one
    self_time: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)

    def share(self, n: int) -> float:
        return 100.0 * n / self.samples if self.samples else 0.0

    def as_dict(self, top: int = 15) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "idle_share": self.share(self.idle),
            "busy_share": self.share(self.samples - self.idle),
            "other_thread_samples": self.other_threads,
            "worker_busy_share": self.share(self.other_busy),
            "self": [[k, self.share(v)] for k, v in self.self_time.most_common(top)],
            "inclusive_fetchd": [
                [k, self.share(v)]
                for k, v in self.inclusive.most_common()
                if k.startswith("fetchd/")
            ][: top + 8],
            "inclusive_all": [[k, self.share(v)] for k, v in self.inclusive.most_common(top)],
        }


def _frames(stack: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for raw in stack.split(";"):
        m = _FRAME.match(raw.strip())
        if m:
            out.append((m.group("func"), _short(m.group("file"))))
        else:
            out.append((raw.strip(), ""))
    return out


def analyse(raw: Path) -> Profile:
    prof = Profile()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        if not frames:
            continue
        func, file = frames[-1]
        if any(f.endswith("threading.py") and fn.endswith("_bootstrap") for fn, f in frames[:3]):
            prof.other_threads += count  # the state's SQLite worker, resolver threads
            if not func.endswith("_worker"):  # _worker on top: waiting for work
                prof.other_busy += count
            continue
        prof.samples += count
        if _is_idle_leaf(func, file):
            prof.idle += count
            continue
        prof.self_time[f"{file}:{func}"] += count
        seen: set[str] = set()
        for fn, f in frames:
            key = f"{f}:{fn}"
            if key not in seen:
                seen.add(key)
                prof.inclusive[key] += count
    return prof


def render(name: str, prof: Profile, top: int = 12) -> str:
    d = prof.as_dict(top)
    lines = [
        f"Profile of fetchd, {name}: {prof.samples} main-thread samples; event loop waiting "
        f"{d['idle_share']:.0f} %, busy {d['busy_share']:.0f} %; SQLite thread busy "
        f"{d['worker_busy_share']:.0f} % (of the same wall time)",
        "  self time (function on top of the stack), % of wall time:",
    ]
    lines += [f"    {share:5.1f} %  {key}" for key, share in d["self"]]
    lines.append("  inclusive time of fetchd's functions, % of wall time:")
    lines += [f"    {share:5.1f} %  {key}" for key, share in d["inclusive_fetchd"]]
    return "\n".join(lines)
