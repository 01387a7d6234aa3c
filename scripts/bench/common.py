"""What the benchmark suites share: child processes, launcher runs, step times, tables.

Every process a suite starts is ended before the suite returns: roles started here die
with this process (PR_SET_PDEATHSIG), and launcher runs and baselines get their own
process group, killed afterwards whatever happened. Every wait has a deadline.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

START_TIMEOUT_S = 60.0    # a role must publish its endpoint / the cluster must form by then
REQUEST_TIMEOUT_S = 60.0  # deadline of every request this process makes
EXIT_TIMEOUT_S = 15.0     # after FINISHED, the scheduler and servers must exit by then
ROLE_TIMEOUT_S = 600.0    # --timeout-s of the roles: longer than any suite, we end them anyway
RUN_TIMEOUT_S = 300.0     # one launcher run, or one baseline run


# -- child processes -------------------------------------------------------------------
def _die_with_parent() -> None:
    """Children get SIGKILL if this process dies, so a killed benchmark leaves nothing behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def child_env() -> dict:
    """The environment of every child: this one, with the repository on PYTHONPATH."""
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


class Children:
    """The processes one measurement starts. ``stop()`` ends every one still running."""

    def __init__(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="ps-bench-")
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> str:
        """Run ``python ARGV --endpoint-file F``; return the endpoint it publishes in F."""
        path = os.path.join(self.tmp.name, f"{name}.endpoint")
        proc = subprocess.Popen([sys.executable, *argv, "--endpoint-file", path], cwd=ROOT,
                                env=child_env(), stdout=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)
        self.procs[name] = proc
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(path):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode} before binding")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} published no endpoint in {START_TIMEOUT_S:.0f} s")
            time.sleep(0.02)
        with open(path) as f:
            return f.read().strip()

    def wait(self, names: list[str], timeout_s: float) -> None:
        """Wait for the named processes to exit on their own, with status 0."""
        deadline = time.monotonic() + timeout_s
        for name in names:
            try:
                rc = self.procs[name].wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{name} did not exit within {timeout_s:.0f} s") from None
            if rc != 0:
                raise RuntimeError(f"{name} exited with status {rc}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.tmp.cleanup()


# -- runs in their own process group (launcher runs, baselines) -------------------------
LAUNCHERS: set[int] = set()   # process groups of the runs in progress


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes ({} once it has gone, or exited unreaped)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = [line.split() for line in f if line.startswith(("VmRSS:", "VmHWM:"))]
    except OSError:
        return {}
    return {parts[0].rstrip(":"): int(parts[1]) * 1024 for parts in lines}


class RoleMemory:
    """Polls the memory of a launcher run's roles (those whose name starts with
    ``prefix``) while it goes on: ``readings[name]`` is a list of (time.time(),
    {"VmRSS": bytes, "VmHWM": bytes}); ``at(name, t)`` the last one taken at or before
    t; ``peak`` and ``last`` map each role to its largest VmHWM and its last VmRSS."""

    def __init__(self, out: str, prefix: str = "", poll_s: float = 0.1):
        self.out, self.prefix, self.poll_s = out, prefix, poll_s
        self.readings: dict[str, list[tuple[float, dict[str, int]]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _poll(self) -> None:
        pids: dict[str, int] = {}
        while not self._stop.wait(self.poll_s):
            if not pids:
                try:
                    with open(os.path.join(self.out, "cluster.json")) as f:
                        roles = json.load(f)["roles"]
                except (OSError, ValueError, KeyError):
                    continue                       # not written yet (or half written)
                pids = {n: r["pid"] for n, r in roles.items() if n.startswith(self.prefix)}
            for name, pid in pids.items():
                reading = proc_status(pid)
                if len(reading) == 2:
                    self.readings.setdefault(name, []).append((time.time(), reading))

    def at(self, name: str, t: float) -> dict[str, int]:
        before = [r for when, r in self.readings.get(name, []) if when <= t]
        return before[-1] if before else {}

    @property
    def peak(self) -> dict[str, int]:
        return {n: max(r["VmHWM"] for _, r in rs) for n, rs in self.readings.items()}

    @property
    def last(self) -> dict[str, int]:
        return {n: rs[-1][1]["VmRSS"] for n, rs in self.readings.items()}


def kill_group(pgid: int) -> None:
    """SIGKILL a run's leader and every process it started (they share its process group)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def group(cmd: list[str], env: dict | None = None):
    """``cmd`` started in a new process group (stdout and stderr piped, as text); the
    group is killed on leaving, whatever happened, so a run leaves nothing behind."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env or child_env())
    LAUNCHERS.add(proc.pid)
    try:
        yield proc
    finally:
        kill_group(proc.pid)
        proc.wait()
        LAUNCHERS.discard(proc.pid)


def run_group(cmd: list[str], what: str, timeout_s: float = RUN_TIMEOUT_S,
              env: dict | None = None) -> tuple[int, str, str]:
    """Run ``cmd`` in a new process group to its end; (status, stdout, stderr)."""
    with group(cmd, env) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{what} run did not finish in {timeout_s:.0f} s") from None
    return proc.returncode, stdout, stderr


def launch_run(argv: list[str], out: str, what: str, lenient: bool = False,
               timeout_s: float = RUN_TIMEOUT_S) -> dict:
    """One ``python -m ps.launch ARGV --quiet --out OUT`` run; its summary.json.

    ``lenient``: a launcher that failed after the scheduler wrote a successful summary
    (a role slow to exit) still counts; the summary gets ``launcher_error`` with the
    launcher's complaint."""
    cmd = [sys.executable, "-m", "ps.launch", *argv, "--quiet", "--out", out]
    rc, _, stderr = run_group(cmd, what, timeout_s)
    summary = None
    if os.path.exists(os.path.join(out, "summary.json")):
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
    if rc != 0:
        if not (lenient and summary and summary.get("ok")):
            raise RuntimeError(f"{what} run failed ({rc}):\n{stderr[-2000:]}")
        summary["launcher_error"] = stderr.strip().splitlines()[-1:]
        print(f"  warning: {what} run: launcher exited {rc} after a successful "
              f"run: {summary['launcher_error']}", file=sys.stderr, flush=True)
    return summary


# -- step times from a run's trace -------------------------------------------------------
def step_end_times(path: str, absolute: bool = False) -> dict[int, float]:
    """When each step's last push (one that carried tasks) ended, in seconds from the
    first worker event of the trace (``absolute``: ``time.time()`` seconds): the moment
    the step's loss exists. In SSP a clock's push is tagged with the clock, in ASP with
    the task's step: the same keys the summary's losses are kept under."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    workers = {e["pid"] for e in events
               if e["ph"] == "M" and e["args"]["name"].startswith("worker")}
    spans = [e for e in events if e["ph"] == "X" and e["pid"] in workers]
    t0 = 0.0 if absolute else min(e["ts"] for e in spans)
    ends: dict[int, float] = {}
    for e in spans:
        if e["name"] == "push" and e["args"].get("tasks", 0) > 0:
            step, end = e["args"]["step"], (e["ts"] + e["dur"] - t0) / 1e6
            ends[step] = max(ends.get(step, 0.0), end)
    return ends


def timed_step_s(ends: dict[int, float], warmup: int) -> float:
    """Mean seconds per step after ``warmup`` steps: from the end of step warmup - 1 to
    the end of the last step. The first steps pay for connections, page faults and the
    allocator, which a longer run amortises; every system here is timed the same way."""
    steps = sorted(ends)
    if len(steps) <= warmup or warmup < 1:
        raise ValueError(f"{len(steps)} steps traced: need more than warmup = {warmup} >= 1")
    first, last = steps[warmup - 1], steps[-1]
    return (ends[last] - ends[first]) / (last - first)


# -- output ----------------------------------------------------------------------------
def markdown(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def count(n: int) -> str:
    """1000000 -> '1M', 100000 -> '100K' (decimal, as --sizes reads them)."""
    units = (("M", 10**6), ("K", 10**3))
    return next((f"{n // k}{u}" for u, k in units if n and n % k == 0), str(n))


def counts(text: str) -> list[int]:
    """'1M,2.5M,100K,7' -> [1000000, 2500000, 100000, 7]."""
    scale = {"K": 10**3, "M": 10**6}
    return [int(float(x.rstrip("KkMm")) * scale.get(x[-1].upper(), 1)) for x in text.split(",")]


def ints(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]."""
    return [int(x) for x in text.split(",")]


def source_state() -> dict:
    """The commit measured, and which files of ps/ and worker/ differed from it."""
    def git(*argv):
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    changed = git("status", "--porcelain", "--", "ps", "worker")
    return {"commit": git("rev-parse", "HEAD") or None,
            "uncommitted": [line[3:] for line in changed.splitlines()]}


def machine() -> dict:
    """What the numbers were measured on."""
    import numpy as np
    import zmq
    info = {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__,
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}
    try:                     # the version without importing torch (a second or two)
        info["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    return info | source_state()
