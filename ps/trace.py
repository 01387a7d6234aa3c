"""Tracing: every role's timeline in the Chrome trace event format.

With ``--trace`` the workers and the scheduler record what they did (a worker's
tasks, pulls, pushes and waits; the scheduler's steals, deaths, rejoins and
checkpoints) as trace events and writes them
to ``<out>/trace/<role>.json`` when it exits; the launcher merges the files into
``<out>/trace.json``, which Perfetto (ui.perfetto.dev) and ``chrome://tracing`` open.
``scripts/plot_trace.py`` draws the tasks per worker as a PNG.

Timestamps are wall-clock microseconds (``time.time``), comparable across the
processes of one machine. A disabled tracer records nothing and costs one branch.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager


class Tracer:
    def __init__(self, out_dir: str | None, role: str, pid: int, file: str | None = None):
        self.enabled = out_dir is not None
        self.path = os.path.join(out_dir, "trace", f"{file or role}.json") if out_dir else None
        self.pid = pid
        self.events: list[dict] = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                                    "args": {"name": role}}] if self.enabled else []

    @contextmanager
    def span(self, name: str, cat: str = "", **args):
        """Record a complete event ("X") around a block."""
        if not self.enabled:
            yield
            return
        start = time.time()
        try:
            yield
        finally:
            self.complete(name, start, time.time(), cat, **args)

    def complete(self, name: str, start_s: float, end_s: float, cat: str = "", **args) -> None:
        if self.enabled:
            self.events.append({"ph": "X", "name": name, "cat": cat, "pid": self.pid, "tid": 0,
                                "ts": start_s * 1e6, "dur": (end_s - start_s) * 1e6, "args": args})

    def instant(self, name: str, cat: str = "", **args) -> None:
        if self.enabled:
            self.events.append({"ph": "i", "s": "p", "name": name, "cat": cat, "pid": self.pid,
                                "tid": 0, "ts": time.time() * 1e6, "args": args})

    def write(self) -> None:
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.events, f)


def merge(out_dir: str) -> str | None:
    """Join every role's trace file into ``<out>/trace.json``; return its path."""
    folder = os.path.join(out_dir, "trace")
    if not os.path.isdir(folder):
        return None
    events = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                events.extend(json.load(f))
    path = os.path.join(out_dir, "trace.json")
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return path
