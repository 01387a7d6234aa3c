#!/usr/bin/env python3
"""Draw a run's tasks per worker over time, with steals marked, as a PNG.

    python scripts/plot_trace.py RUN_DIR/trace.json -o timeline.png [--title TEXT]

Reads the Chrome trace written by ``start_cluster.sh --trace``. One row per worker;
each forward and backward pass is a bar, over the tasks computed in it (a fused lease:
one bar for several tasks; stolen ones, those the worker took from another's deque, are
hatched), pulls/pushes/waits are thin grey bars under it, and each steal is a
triangle on the thief's row. Needs matplotlib (``pip install matplotlib``).
"""
from __future__ import annotations

import argparse
import json
import sys


def load(path: str):
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    workers = sorted((pid for pid, n in names.items() if n.startswith("worker")),
                     key=lambda pid: names[pid])
    t0 = min(e["ts"] for e in events if "ts" in e)
    return events, names, workers, t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="trace.json of a run made with --trace")
    p.add_argument("-o", "--output", default="timeline.png", help="PNG to write")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_trace.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 1
    events, names, workers, t0 = load(a.trace)
    stolen_tasks = set()
    steals = [e for e in events if e["name"] == "steal"]
    for e in steals:
        stolen_tasks.add(e["args"]["task"])
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.7 * len(workers)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    row = {pid: i for i, pid in enumerate(workers)}
    for e in events:
        if e["ph"] != "X" or e["pid"] not in row:
            continue
        y, start, dur = row[e["pid"]], (e["ts"] - t0) / 1e6, e["dur"] / 1e6
        if e["name"] == "task":
            color = colors[e["args"]["step"] % len(colors)]
            ax.broken_barh([(start, dur)], (y - 0.35, 0.6), facecolors=color, edgecolor="black",
                           linewidth=0.3, hatch="///" if e["args"]["task"] in stolen_tasks else None)
        else:
            ax.broken_barh([(start, dur)], (y + 0.28, 0.1), facecolors="0.6")
    thief_row = {int(names[pid][len("worker"):]): row[pid] for pid in workers}
    for e in steals:
        ax.plot((e["ts"] - t0) / 1e6, thief_row.get(e["args"]["thief"], -1) + 0.45, "v",
                color="crimson", markersize=6)
    ax.set_yticks(range(len(workers)))
    ax.set_yticklabels([names[pid] for pid in workers])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first event (bars: passes over leased tasks, coloured by step; "
                  "hatched: stolen; grey: pull/push/wait; triangles: steals)", fontsize=8)
    ax.set_title(a.title or a.trace, fontsize=10)
    fig.tight_layout()
    fig.savefig(a.output, dpi=110)
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
