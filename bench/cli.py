"""``python -m bench``: run the scenarios, print the table, write JSON and a chart.

Scenarios (sizes as accountsxmessages; ``--quick`` uses the small ones):

====  ==========================================================  ==========  =========
name  what                                                        full        --quick
====  ==========================================================  ==========  =========
a     one big mailbox, IMAPS                                      1x2000      1x200
b     many small mailboxes, IMAPS and POP3S                       200x20      20x5
c     very many tiny mailboxes, IMAPS                             1000x5      100x2
d     ``fetchd run``: accounts idling in IMAP IDLE, push delay    1000 / 500  100 / 50
e     one 25 MiB message, IMAPS: peak RSS                         25 MiB      5 MiB
f     client CPU per message at (b) (runs b)                      —           —
====  ==========================================================  ==========  =========

Each of a, b, c, e runs fetchd (``fetchd once``), fetchmail and the ceiling in turn, reloading
the mailboxes before each, and checks that every message arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import report
from bench.clients import (
    REPO,
    Run,
    ceiling_argv,
    fetchd_account,
    fetchd_argv,
    fetchd_env,
    fetchmail_argv,
    fetchmail_env,
    measure,
    write_ceiling_spec,
    write_fetchd_config,
    write_fetchmail_rc,
)
from bench.idle import IdleResult, run_idle
from bench.mail import MailFactory, Message
from bench.profile import analyse, py_spy, record_argv, render
from bench.server import BenchServer, Mailbox, bench_server, doveadm_version, require_programs
from bench.sink import Sink

CLIENTS = ("fetchd", "fetchmail", "ceiling", "ceiling-each")
MiB = 1 << 20
# Dovecot log lines that every run of the test configuration has, and that mean no harm.
KNOWN_LOG_LINES = (
    "is lower than required under max. load",  # a warning about the test config's limits
    "Trying to iterate users",  # doveadm -F (a list of users) asks the userdb first
)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    protocols: tuple[str, ...]
    full: tuple[int, int]
    quick: tuple[int, int]


SCENARIOS = {
    "a": Scenario("a", "1 account x 2,000 messages", ("imap",), (1, 2000), (1, 200)),
    "b": Scenario("b", "200 accounts x 20 messages", ("imap", "pop3"), (200, 20), (20, 5)),
    "c": Scenario("c", "1,000 accounts x 5 messages", ("imap",), (1000, 5), (100, 2)),
    "d": Scenario(
        "d", "1,000 accounts idling, 500 pushed messages", ("imap",), (1000, 500), (100, 50)
    ),
    "e": Scenario("e", "one 25 MiB message", ("imap",), (1, 25), (1, 5)),
    "f": Scenario("f", "client CPU per message at (b)", (), (0, 0), (0, 0)),
}


@dataclass
class Context:
    args: argparse.Namespace
    tmp: Path
    out: Path
    sink: Sink
    factory: MailFactory
    clients: list[str]
    runs: list[Run] = field(default_factory=list)
    idle: IdleResult | None = None
    profiles: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.out / "logs"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark fetchd against fetchmail and a download-only ceiling on a private "
        "Dovecot (127.0.0.1 only).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Scenarios: "
        + "; ".join(f"{s.name}: {s.title}" for s in SCENARIOS.values())
        + ". Sizes: --size a=1x500 --size d=1000x500 (accounts x messages), --size e=25 (MiB).",
    )
    p.add_argument(
        "scenarios",
        nargs="*",
        default=["a", "b", "c", "d", "e", "f"],
        help="scenario names (default: all), e.g. b c",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes: a smoke run of a minute or two"
    )
    p.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="S=AxM",
        help="override a scenario's size: accounts x messages (e: MiB)",
    )
    p.add_argument(
        "--clients",
        default="fetchd,fetchmail,ceiling",
        help=f"comma-separated, run in this order; any of {', '.join(CLIENTS)} "
        "(ceiling-each: the ceiling with a round trip per message)",
    )
    p.add_argument(
        "--sink-ack",
        choices=("quick", "delayed"),
        default="quick",
        help="quick (default): the sink ACKs every segment at once (TCP_QUICKACK); delayed: an "
        "ordinary listener, whose delayed ACKs stall clients that leave Nagle on",
    )
    p.add_argument("--max-connections", type=int, default=200, help="fetchd's and the ceiling's")
    p.add_argument(
        "--corpus", action="store_true", help="use tests/corpus/*.eml, not synthetic mail"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--idle-inject",
        choices=("save", "maildir"),
        default="save",
        help="(d) how a message arrives: doveadm save, or a Maildir write (tmp/ then new/)",
    )
    p.add_argument("--idle-rate", type=float, default=20.0, help="(d) messages per second")
    p.add_argument(
        "--idle-client-limit",
        type=int,
        default=25,
        help="(d) IMAP sessions per Dovecot imap process (1: one process each)",
    )
    p.add_argument("--profile", action="store_true", help="also profile fetchd (py-spy) on a, b, c")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<time>)")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p


def _sizes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    sizes = {k: (s.quick if args.quick else s.full) for k, s in SCENARIOS.items()}
    for item in args.size:
        name, _, value = item.partition("=")
        if name not in SCENARIOS:
            raise SystemExit(f"bench: unknown scenario in --size {item}")
        if name == "e":
            sizes["e"] = (1, int(value))
        else:
            a, _, m = value.lower().partition("x")
            sizes[name] = (int(a), int(m))
    return sizes


def _raise_fd_limit() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except OSError:
        return "missing"
    text = (r.stdout + r.stderr).strip().splitlines()
    return next((t for t in text if "release" in t or t[:1].isdigit()), text[0] if text else "")


def _meta(args: argparse.Namespace, sizes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    git = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "fetchd"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dovecot": doveadm_version(),
        "fetchmail": _version(["fetchmail", "--version"]),
        "fetchd_commit": git + (" (with uncommitted changes in fetchd/)" if dirty else ""),
        "loadavg_start": os.getloadavg()[0],
        "quick": args.quick,
        "sink_ack": args.sink_ack,
        "max_connections": args.max_connections,
        "mail": "tests/corpus" if args.corpus else f"synthetic (seed {args.seed})",
        "sizes": {k: list(v) for k, v in sizes.items()},
        "idle_inject": args.idle_inject,
        "idle_rate": args.idle_rate,
        "idle_client_limit": args.idle_client_limit,
    }


# -- one client run ----------------------------------------------------------------------------


async def _client_run(
    ctx: Context,
    server: BenchServer,
    work: Path,
    *,
    scenario: str,
    protocol: str,
    client: str,
    boxes: list[Mailbox],
    per_account: int,
    messages: Callable[[int, Mailbox], Iterable[Message]],
) -> Run:
    count, nbytes = await asyncio.to_thread(server.load, boxes, messages)
    ctx.sink.stats.reset()
    label = f"{scenario}-{protocol}-{client}"
    log = ctx.logs / f"{label}.log"
    problems: list[str] = []
    extra: dict[str, Any] = {}
    timeout = 3600.0
    if client == "fetchd":
        config = write_fetchd_config(
            work / "fetchd",
            [fetchd_account(server, b, protocol, ctx.sink.port) for b in boxes],
            max_connections=ctx.args.max_connections,
        )
        m = await measure(
            fetchd_argv(config), server=server, log=log, timeout=timeout, env=fetchd_env(), cwd=REPO
        )
    elif client == "fetchmail":
        home = work / "fetchmail"
        rc = write_fetchmail_rc(home, server, boxes, protocol, ctx.sink.port)
        m = await measure(
            fetchmail_argv(rc, home),
            server=server,
            log=log,
            timeout=timeout,
            env=fetchmail_env(home),
        )
    else:
        spec = write_ceiling_spec(
            work / "ceiling",
            server,
            boxes,
            protocol,
            ctx.args.max_connections,
            mode="each" if client == "ceiling-each" else "all",
        )
        m = await measure(ceiling_argv(spec), server=server, log=log, timeout=timeout, cwd=REPO)
    received = ctx.sink.stats.messages
    if m.returncode != 0:
        problems.append(f"exit status {m.returncode} (see {log.name})")
    if client.startswith("ceiling"):
        try:
            got = json.loads(log.read_text().strip().splitlines()[-1])
        except (ValueError, IndexError):
            got = {"messages": 0, "bytes": 0, "errors": ["no report"]}
        received = int(got["messages"])
        extra["downloaded_bytes"] = got["bytes"]
        if got["bytes"] < nbytes:
            problems.append(f"downloaded {got['bytes']} bytes of {nbytes}")
        problems += got.get("errors", [])[:3]
    else:
        left = sum((await asyncio.to_thread(server.counts, boxes)).values())
        if left:
            problems.append(f"{left} messages left on the server")
        extra["sink_bytes"] = ctx.sink.stats.bytes
        extra["smtp_connections"] = ctx.sink.stats.connections
    if received != count:
        problems.append(f"{received} of {count} messages arrived")
    run = Run(
        scenario=scenario,
        protocol=protocol,
        client=client,
        accounts=len(boxes),
        per_account=per_account,
        messages=count,
        bytes=nbytes,
        wall=m.wall,
        cpu_user=m.user,
        cpu_system=m.system,
        peak_rss_mb=m.peak_rss_mb,
        server_cpu=m.server_cpu,
        sink_cpu=m.sink_cpu,
        received=received,
        ok=not problems,
        problems=problems,
        extra=extra,
    )
    print(report.run_line(run), flush=True)
    return run


async def _profile(
    ctx: Context,
    server: BenchServer,
    work: Path,
    label: str,
    protocol: str,
    boxes: list[Mailbox],
    messages: Callable[[int, Mailbox], Iterable[Message]],
) -> None:
    pyspy = py_spy()
    if pyspy is None:
        ctx.notes.append("profile skipped: py-spy not found (bench/run installs it in bench/.venv)")
        return
    count, _ = await asyncio.to_thread(server.load, boxes, messages)
    ctx.sink.stats.reset()
    config = write_fetchd_config(
        work / "fetchd-profile",
        [fetchd_account(server, b, protocol, ctx.sink.port) for b in boxes],
        max_connections=ctx.args.max_connections,
    )
    raw = ctx.out / "profiles" / f"{label}.txt"
    raw.parent.mkdir(exist_ok=True)
    m = await measure(
        record_argv(pyspy, raw, fetchd_argv(config)),
        server=server,
        log=ctx.logs / f"{label}-profile.log",
        timeout=3600,
        env=fetchd_env(),
        cwd=REPO,
    )
    if not raw.exists():
        ctx.notes.append(f"profile {label}: failed (status {m.returncode}, see logs)")
        return
    if ctx.sink.stats.messages != count:
        ctx.notes.append(
            f"profile {label}: under the profiler fetchd delivered {ctx.sink.stats.messages} of "
            f"{count} messages (see {label}-profile.log)"
        )
    prof = analyse(raw)
    ctx.profiles[label] = {
        "wall_under_profiler": m.wall,
        "delivered_under_profiler": ctx.sink.stats.messages,
        "messages": count,
        **prof.as_dict(),
    }
    print(render(label, prof), flush=True)


# -- scenarios ---------------------------------------------------------------------------------


async def _throughput(
    ctx: Context, name: str, protocol: str, size: tuple[int, int], *, big: int = 0
) -> None:
    accounts, per_account = size
    work = ctx.tmp / f"{name}-{protocol}"
    work.mkdir(parents=True, exist_ok=True)
    factory = ctx.factory
    if big:
        big_message = factory.big(big)

        def messages(i: int, box: Mailbox) -> Iterable[Message]:
            return [big_message]

        per_account = 1
    else:

        def messages(i: int, box: Mailbox) -> Iterable[Message]:
            return (factory.message(i, n) for n in range(per_account))

    title = f"({name}) {protocol.upper()} {accounts}x{per_account}"
    print(f"\n== {title}", flush=True)
    with bench_server(work) as server:
        boxes = server.add_mailboxes(accounts)
        for client in ctx.clients:
            if client == "ceiling-each" and big:
                continue
            run = await _client_run(
                ctx,
                server,
                work,
                scenario=name,
                protocol=protocol,
                client=client,
                boxes=boxes,
                per_account=per_account,
                messages=messages,
            )
            ctx.runs.append(run)
        if ctx.args.profile and name in ("a", "b", "c"):
            await _profile(ctx, server, work, f"{name}-{protocol}", protocol, boxes, messages)
        log = server.dovecot.log()
    (ctx.logs / f"{name}-{protocol}-dovecot.log").write_text(log)
    errors = [
        line
        for line in log.splitlines()
        if any(w in line for w in (": Error:", ": Fatal:", ": Warning:", ": Panic:"))
        and not any(known in line for known in KNOWN_LOG_LINES)
    ]
    if errors:
        ctx.notes.append(f"{title}: Dovecot logged {len(errors)} warnings/errors, e.g. {errors[0]}")


async def _idle(ctx: Context, size: tuple[int, int]) -> None:
    accounts, messages = size
    print(f"\n== (d) IMAP IDLE: {accounts} accounts, {messages} pushed messages", flush=True)
    work = ctx.tmp / "d"
    work.mkdir(parents=True, exist_ok=True)
    with bench_server(work, idle_client_limit=ctx.args.idle_client_limit) as server:
        result = await run_idle(
            server,
            work,
            accounts=accounts,
            messages=messages,
            inject=ctx.args.idle_inject,
            rate=ctx.args.idle_rate,
            seed=ctx.args.seed,
            log=ctx.logs / "d-fetchd-run.log",
        )
        log = server.dovecot.log()
    (ctx.logs / "d-dovecot.log").write_text(log)
    if "inotify" in log.lower():
        result.problems.append("Dovecot logged an inotify problem: push may be delayed")
    ctx.idle = result
    print(report.idle_text(result), flush=True)


async def _main(args: argparse.Namespace) -> int:
    sizes = _sizes(args)
    wanted = list(dict.fromkeys(s for name in args.scenarios for s in name.split(",") if s))
    unknown = [s for s in wanted if s not in SCENARIOS]
    if unknown:
        print(f"bench: unknown scenario(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    if "f" in wanted and "b" not in wanted:
        wanted.insert(wanted.index("f"), "b")
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if bad := [c for c in clients if c not in CLIENTS]:
        print(f"bench: unknown client(s): {', '.join(bad)}", file=sys.stderr)
        return 2
    programs = ["dovecot", "doveadm"] + (["fetchmail"] if "fetchmail" in clients else [])
    if missing := require_programs(programs):
        print(
            f"bench: missing {', '.join(missing)}: run scripts/bootstrap and install "
            "Debian's fetchmail (bench/run does both)",
            file=sys.stderr,
        )
        return 2
    soft, _ = _raise_fd_limit()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "bench" / "results" / stamp
    (out / "logs").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fetchd-bench-"))
    os.chmod(tmp, 0o755)  # noqa: S103 - Dovecot's unprivileged processes read the CA file there
    meta = _meta(args, sizes)
    meta["open_files_limit"] = soft
    corpus = REPO / "tests" / "corpus" if args.corpus else None
    sink = Sink(quickack=args.sink_ack == "quick")
    await sink.start()
    ctx = Context(args, tmp, out, sink, MailFactory(seed=args.seed, corpus=corpus), clients)
    print(
        f"fetchd benchmarks: scenarios {' '.join(wanted)}, {'quick' if args.quick else 'full'} "
        f"sizes, clients {', '.join(clients)}, sink ACKs {args.sink_ack}; results in {out}",
        flush=True,
    )
    try:
        for name in wanted:
            if name in ("a", "b", "c"):
                for protocol in SCENARIOS[name].protocols:
                    await _throughput(ctx, name, protocol, sizes[name])
            elif name == "e":
                await _throughput(ctx, "e", "imap", (1, 1), big=sizes["e"][1] * MiB)
            elif name == "d":
                await _idle(ctx, sizes["d"])
    finally:
        await sink.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    meta["loadavg_end"] = os.getloadavg()[0]
    results = report.results(meta, ctx.runs, ctx.idle, ctx.profiles, ctx.notes, wanted)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print()
    print(report.text(results))
    if not args.no_chart:
        print(chart(out / "results.json", out / "chart.png"))
    return 0 if all(r.ok for r in ctx.runs) and (ctx.idle is None or ctx.idle.ok) else 1


def chart(results: Path, png: Path) -> str:
    """Draw the chart with the benchmark's own environment, which has matplotlib."""
    python = REPO / "bench" / ".venv" / "bin" / "python"
    if not python.exists():
        return "chart skipped: bench/.venv is missing (bench/run creates it, with matplotlib)"
    r = subprocess.run(
        [str(python), "-m", "bench.chart", str(results), str(png)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        return f"chart skipped: {r.stderr.strip().splitlines()[-1:] or r.returncode}"
    return f"chart: {png}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 130
