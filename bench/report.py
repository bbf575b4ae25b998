"""The results: one JSON document, a text table, ratios and the targets' verdicts.

Units: wall and CPU in seconds; MB/s in 10^6 bytes of mail (as the server serves it) per
second; RSS in MiB.
"""

from __future__ import annotations

from typing import Any

from bench.clients import Run
from bench.idle import IdleResult

MiB = 1 << 20


def run_line(r: Run) -> str:
    status = "ok" if r.ok else "FAILED: " + "; ".join(r.problems)
    return (
        f"  {r.client:<12} {r.wall:8.2f} s {r.msgs_per_s:9.1f} msg/s {r.mb_per_s:7.2f} MB/s "
        f"CPU {r.cpu:7.2f} s ({r.cpu_ms_per_msg:6.2f} ms/msg) RSS {r.peak_rss_mb:7.1f} MiB "
        f"Dovecot {r.server_cpu:6.2f} s  {status}"
    )


def idle_text(r: IdleResult) -> str:
    d = r.as_dict()
    lines = [
        f"  {r.accounts} accounts idle after {r.seconds_to_all_idle:.1f} s; fetchd RSS "
        f"{r.rss_idle_mb:.1f} MiB idle, {r.rss_end_mb:.1f} MiB at the end, peak {r.peak_rss_mb:.1f}"
        f" MiB; fetchd CPU {r.fetchd_cpu_startup:.1f} s to get idle, {r.fetchd_cpu_total:.1f} s "
        f"in all; Dovecot CPU {r.server_cpu_total:.1f} s",
        f"  push delay over {len(r.delays)} messages ({r.inject}, {r.rate:g}/s): p50 "
        f"{d['p50'] * 1000:.0f} ms, p90 {d['p90'] * 1000:.0f} ms, p99 {d['p99'] * 1000:.0f} ms, "
        f"max {d['max'] * 1000:.0f} ms"
        + (
            f" (doveadm save itself: median {r.inject_seconds_median * 1000:.0f} ms)"
            if r.inject == "save"
            else ""
        ),
    ]
    if r.problems:
        lines.append("  PROBLEMS: " + "; ".join(r.problems))
    return "\n".join(lines)


def _find(
    runs: list[dict[str, Any]], scenario: str, protocol: str, client: str
) -> dict[str, Any] | None:
    for r in runs:
        if (r["scenario"], r["protocol"], r["client"]) == (scenario, protocol, client) and r["ok"]:
            return r
    return None


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    keys = dict.fromkeys((r["scenario"], r["protocol"]) for r in runs)
    for scenario, protocol in keys:
        fd = _find(runs, scenario, protocol, "fetchd")
        fm = _find(runs, scenario, protocol, "fetchmail")
        ce = _find(runs, scenario, protocol, "ceiling")
        row: dict[str, Any] = {"scenario": scenario, "protocol": protocol}
        if fd and fm:
            row["fetchd_vs_fetchmail_speed"] = fd["msgs_per_s"] / fm["msgs_per_s"]
            if fm["cpu_ms_per_msg"]:
                row["fetchd_vs_fetchmail_cpu_per_msg"] = fd["cpu_ms_per_msg"] / fm["cpu_ms_per_msg"]
        if fd and ce:
            row["fetchd_vs_ceiling_speed"] = fd["msgs_per_s"] / ce["msgs_per_s"]
        out.append(row)
    return out


def verdicts(
    runs: list[dict[str, Any]], idle: dict[str, Any] | None, meta: dict[str, Any], wanted: list[str]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    note = " (quick sizes: indicative only)" if meta.get("quick") else ""
    if meta.get("sink_ack") != "quick":
        note += " (sink with delayed ACKs, not the target's)"

    def add(scenario: str, target: str, measured: str, met: bool | None) -> None:
        verdict = "not run" if met is None else ("met" if met else "MISSED")
        out.append(
            {
                "scenario": scenario,
                "target": target,
                "measured": measured + note,
                "verdict": verdict,
            }
        )

    rows = {(r["scenario"], r["protocol"]): r for r in ratios(runs)}
    if "b" in wanted:
        for protocol in ("imap", "pop3"):
            row = rows.get(("b", protocol), {})
            x = row.get("fetchd_vs_fetchmail_speed")
            add(
                "b",
                f"{protocol.upper()}: fetchd ≥ 5x fetchmail (msgs/s)",
                f"{x:.2f}x" if x else "—",
                None if x is None else x >= 5,
            )
            y = row.get("fetchd_vs_ceiling_speed")
            add(
                "b",
                f"{protocol.upper()}: fetchd ≥ 50 % of the ceiling",
                f"{100 * y:.0f} %" if y else "—",
                None if y is None else y >= 0.5,
            )
    if "c" in wanted:
        y = rows.get(("c", "imap"), {}).get("fetchd_vs_ceiling_speed")
        add(
            "c",
            "fetchd ≥ 80 % of the ceiling",
            f"{100 * y:.0f} %" if y else "—",
            None if y is None else y >= 0.8,
        )
    if "d" in wanted:
        if idle and idle.get("peak_rss_mb"):
            add(
                "d",
                f"peak RSS < 200 MiB with {idle['accounts']} idling accounts",
                f"{idle['peak_rss_mb']:.0f} MiB",
                idle["peak_rss_mb"] < 200,
            )
            p99 = float(idle.get("p99", float("nan")))
            add(
                "d",
                "push delay p99 < 1 s",
                f"p99 {p99 * 1000:.0f} ms (p50 {idle['p50'] * 1000:.0f} ms)" if p99 == p99 else "—",
                None if p99 != p99 else p99 < 1.0,
            )
        else:
            add("d", "peak RSS < 200 MiB; p99 < 1 s", "failed to run", False)
    if "e" in wanted:
        r = _find(runs, "e", "imap", "fetchd")
        if r:
            limit = 3 * r["bytes"] / MiB + 60
            add(
                "e",
                f"peak RSS < 3 x message size + 60 MiB = {limit:.0f} MiB",
                f"{r['peak_rss_mb']:.0f} MiB",
                r["peak_rss_mb"] < limit,
            )
        else:
            add("e", "peak RSS < 3 x size + 60 MiB", "—", None)
    if "f" in wanted:
        for protocol in ("imap", "pop3"):
            fd, fm = _find(runs, "b", protocol, "fetchd"), _find(runs, "b", protocol, "fetchmail")
            if fd and fm:
                add(
                    "f",
                    f"{protocol.upper()}: client CPU per message ≤ 2x fetchmail's",
                    f"{fd['cpu_ms_per_msg']:.2f} vs {fm['cpu_ms_per_msg']:.2f} ms "
                    f"({fd['cpu_ms_per_msg'] / fm['cpu_ms_per_msg']:.2f}x)",
                    fd["cpu_ms_per_msg"] <= 2 * fm["cpu_ms_per_msg"],
                )
            else:
                add("f", f"{protocol.upper()}: CPU per message ≤ 2x fetchmail's", "—", None)
    return out


def results(
    meta: dict[str, Any],
    runs: list[Run],
    idle: IdleResult | None,
    profiles: dict[str, Any],
    notes: list[str],
    wanted: list[str],
) -> dict[str, Any]:
    run_dicts = [r.as_dict() for r in runs]
    idle_dict = idle.as_dict() if idle else None
    return {
        "meta": meta,
        "runs": run_dicts,
        "ratios": ratios(run_dicts),
        "idle": idle_dict,
        "verdicts": verdicts(run_dicts, idle_dict, meta, wanted),
        "profiles": profiles,
        "notes": notes,
    }


def table(runs: list[dict[str, Any]]) -> str:
    head = (
        "| scen. | proto | client | accounts x msgs | MB | wall s | msgs/s | MB/s | client CPU s "
        "| CPU ms/msg | peak RSS MiB | Dovecot CPU s | sink CPU s | ok |"
    )
    lines = [head, "|" + "|".join(["---"] * 14) + "|"]
    for r in runs:
        lines.append(
            f"| {r['scenario']} | {r['protocol'].upper()} | {r['client']} | "
            f"{r['accounts']} x {r['per_account']} | {r['bytes'] / 1e6:.1f} | {r['wall']:.2f} | "
            f"{r['msgs_per_s']:.1f} | {r['mb_per_s']:.2f} | {r['cpu']:.2f} | "
            f"{r['cpu_ms_per_msg']:.2f} | {r['peak_rss_mb']:.1f} | {r['server_cpu']:.2f} | "
            f"{r['sink_cpu']:.2f} | {'yes' if r['ok'] else 'NO'} |"
        )
    return "\n".join(lines)


def text(results: dict[str, Any]) -> str:
    meta = results["meta"]
    parts = [
        f"fetchd benchmarks, {meta['date']}: {meta['cores']} cores, Dovecot {meta['dovecot']}, "
        f"{meta['fetchmail']}, Python {meta['python']}, fetchd {meta['fetchd_commit']}; "
        f"load average {meta['loadavg_start']:.2f} → {meta.get('loadavg_end', 0):.2f}",
        "",
        table(results["runs"]),
        "",
    ]
    if results["ratios"]:
        parts.append(
            "| scen. | proto | fetchd/fetchmail (msgs/s) | fetchd/ceiling (msgs/s) "
            "| fetchd/fetchmail (CPU per msg) |"
        )
        parts.append("|---|---|---|---|---|")
        for row in results["ratios"]:

            def f(key: str, pct: bool = False, row: dict[str, Any] = row) -> str:
                v = row.get(key)
                if v is None:
                    return "—"
                return f"{100 * v:.0f} %" if pct else f"{v:.2f}x"

            parts.append(
                f"| {row['scenario']} | {row['protocol'].upper()} "
                f"| {f('fetchd_vs_fetchmail_speed')} | {f('fetchd_vs_ceiling_speed', True)} "
                f"| {f('fetchd_vs_fetchmail_cpu_per_msg')} |"
            )
        parts.append("")
    idle = results.get("idle")
    if idle:
        parts.append(
            f"(d) IDLE: {idle['accounts']} accounts; all idle after "
            f"{idle['seconds_to_all_idle']:.1f} s; fetchd RSS idle {idle['rss_idle_mb']:.1f} MiB, "
            f"peak {idle['peak_rss_mb']:.1f} MiB; fetchd CPU {idle['fetchd_cpu_total']:.1f} s; "
            f"push delay over {len(idle['delays'])} messages: p50 {idle['p50'] * 1000:.0f} ms, "
            f"p90 {idle['p90'] * 1000:.0f} ms, p99 {idle['p99'] * 1000:.0f} ms, max "
            f"{idle['max'] * 1000:.0f} ms"
            + ("" if idle["ok"] else "  PROBLEMS: " + "; ".join(idle["problems"]))
        )
        parts.append("")
    parts.append("| scen. | target | measured | verdict |")
    parts.append("|---|---|---|---|")
    for v in results["verdicts"]:
        parts.append(f"| {v['scenario']} | {v['target']} | {v['measured']} | {v['verdict']} |")
    for note in results["notes"]:
        parts.append(f"note: {note}")
    return "\n".join(parts)
