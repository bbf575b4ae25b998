"""The chart of a results file: ``python -m bench.chart RESULTS.json CHART.png``.

Runs in the benchmark's own virtual environment (bench/.venv, which has matplotlib); it needs
nothing else from the project.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CLIENTS = ("fetchd", "fetchmail", "ceiling")
COLOURS = {"fetchd": "#2b6cb0", "fetchmail": "#c05621", "ceiling": "#718096"}


def _label(run: dict[str, Any]) -> str:
    return f"({run['scenario']}) {run['protocol'].upper()}\n{run['accounts']}x{run['per_account']}"


def chart(results: dict[str, Any], output: str) -> None:
    runs = [r for r in results["runs"] if r["scenario"] in ("a", "b", "c")]
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(_label(r), {})[r["client"]] = r
    big = [r for r in results["runs"] if r["scenario"] == "e"]
    idle = results.get("idle")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [3, 3, 2]})
    width = 0.27
    labels = list(groups)
    for ax, key, title, fmt in (
        (axes[0], "msgs_per_s", "Throughput (messages/s, higher is better)", "{:.0f}"),
        (axes[1], "cpu_ms_per_msg", "Client CPU per message (ms, lower is better)", "{:.2f}"),
    ):
        for k, client in enumerate(CLIENTS):
            xs, ys = [], []
            for i, label in enumerate(labels):
                r = groups[label].get(client)
                if r is not None and r["ok"]:
                    xs.append(i + (k - 1) * width)
                    ys.append(r[key])
            bars = ax.bar(xs, ys, width, label=client, color=COLOURS[client])
            ax.bar_label(bars, [fmt.format(y) for y in ys], fontsize=7, padding=1)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper center", ncols=3)
        ax.set_ylim(top=ax.get_ylim()[1] * 2.5)
    ax = axes[2]
    names: list[str] = []
    values: list[float] = []
    colours: list[str] = []
    targets: list[float] = []
    for r in big:
        names.append(f"(e) {r['client']}\n{r['bytes'] / 2**20:.0f} MiB msg")
        values.append(r["peak_rss_mb"])
        colours.append(COLOURS[r["client"]])
        targets.append(3 * r["bytes"] / 2**20 + 60 if r["client"] == "fetchd" else float("nan"))
    if idle:
        names.append(f"(d) fetchd\n{idle['accounts']} idle")
        values.append(idle["peak_rss_mb"])
        colours.append(COLOURS["fetchd"])
        targets.append(200.0)
    bars = ax.bar(range(len(names)), values, color=colours)
    ax.bar_label(bars, [f"{v:.0f}" for v in values], fontsize=7, padding=1)
    for i, t in enumerate(targets):
        if t == t:  # not NaN
            ax.hlines(t, i - 0.4, i + 0.4, colors="red", linestyles="dashed")
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_ylim(0, max(values + [t for t in targets if t == t] + [1]) * 1.12)
    ax.set_title("Peak RSS (MiB; dashed: target)", fontsize=10)
    meta = results.get("meta", {})
    fig.suptitle(
        f"fetchd benchmarks — {meta.get('date', '')}, {meta.get('cores', '?')} cores, "
        f"{'quick sizes' if meta.get('quick') else 'full sizes'}, sink: {meta.get('sink_ack', '')}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(output, dpi=110)


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        results = json.load(f)
    chart(results, argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
