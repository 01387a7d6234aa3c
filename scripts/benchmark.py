"""Benchmarks: how fast the data path moves parameters, and how fast each mode trains.

    python scripts/benchmark.py transport [--sizes 1M,10M,25M] [--servers 1,2] [--rounds N]
    python scripts/benchmark.py modes [--steps K] [--repeats N]
    python scripts/benchmark.py stragglers [--workers 2,4] [--steps K] [--repeats N]
    (each with --tiny: a few-second run that shows the suite works; --json F: where to write)

transport  A scheduler and S servers run as subprocesses; this process is the only worker
           (numpy, no torch) of a model of N float32 and times round trips: pull all
           shards, push all shards (BSP, one task per step, SGD with lr 0). Alternating
           with it block by block, so machine noise hits both alike, raw pyzmq moves the
           same bytes between two processes: a DEALER sends 4N bytes as 8 MiB frames
           (copy=False), a ROUTER peer answers with 4N bytes. The best block of each
           counts (noise only slows a block down). "ps / raw" prices all the parameter
           server adds: headers and checks, the server's aggregation and optimizer step,
           the copy into the worker's flat buffer, S connections instead of one.
modes      The MLP example, 2 workers x 2 servers, in BSP, SSP (staleness 2) and ASP via
           ``python -m ps.launch``; numbers from each run's summary.json (median run).
stragglers Work stealing against static dealing (``--no-steal``) on a compute-bound job
           (scripts/jobs/compute_bound.py: tasks of tens of ms on one thread), 1 server,
           ``--threads 1``. (a) BSP with worker 1 ``--slow 1=3``, 2 and 4 workers:
           samples/s with and without stealing, and wall time against the ideal
           (total compute / sum of worker speeds, speeds measured in (b)'s runs);
           (b) the same without a slow worker: what stealing costs when nothing is
           slow; (c) ``--jitter 0.2:3`` (any task 3x slow, p = 0.2) in BSP, SSP(2) and
           ASP: wall time until a step's loss first falls below a target, from each
           run's ``--trace`` (the end of the last push of that step). Stealing and
           static runs alternate (A B A B ...); each cell is the median of the repeats.
           On a shared machine other jobs' CPU spoils timings, so each run first waits
           (up to --settle-s) for a quiet second, measures the CPU that processes outside
           the benchmark used meanwhile ("other load", in cores), and is run again (up to
           --redos times) if that passed NOISY_CORES.

Each suite prints a markdown table and writes JSON (default bench/<suite>.json).
1 GB here is 1e9 bytes; 1M parameters is 1,000,000 float32.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ps import wire                                    # noqa: E402
from ps.client import Peer, ShardClient, ShardInfo     # noqa: E402
from ps.protocol import Kind                           # noqa: E402

MLP_JOB = os.path.join(ROOT, "examples", "mlp_classifier.py")
BLOCK_BYTES = 1.6e9       # bytes a timed block moves by default: ~1-2 s, long enough to swamp
                          # jitter, short enough for the default suite to take ~30 s on 2 cores
WARMUP_ROUNDS = 2         # untimed round trips first: connections, page faults, allocator
REPEATS = 3               # alternating raw/ps blocks (transport) or runs per mode (modes)
START_TIMEOUT_S = 60.0    # a role must publish its endpoint / the cluster must form by then
REQUEST_TIMEOUT_S = 60.0  # deadline of every request this process makes
EXIT_TIMEOUT_S = 15.0     # after FINISHED, the scheduler and servers must exit by then
ROLE_TIMEOUT_S = 600.0    # --timeout-s of the roles: longer than any suite, we end them anyway
MODE_TIMEOUT_S = 300.0    # one launcher run of the modes suite
STRAGGLER_JOB = os.path.join(ROOT, "scripts", "jobs", "compute_bound.py")
SLOW_FACTOR = 3.0         # --slow 1=3: worker 1 takes 3x as long per task
JITTER = "0.2:3"          # --jitter P:F of the time-to-target runs
THROUGHPUT_STEPS = 20     # BSP steps of a throughput run: ~3-10 s of training on 2 cores
TARGET_LOSS = 1.5         # a loss every mode reaches (ln(10) ~ 2.3 at the start); measured
                          # under jitter: BSP at step 14, SSP(2) ~24, ASP ~8
TARGET_STEPS = {"bsp": 20, "ssp": 32, "asp": 12}   # steps per mode of a time-to-target run:
                          # enough to pass TARGET_LOSS with margin, no more
STRAGGLER_REPEATS = 2     # runs per cell of the stragglers suite (it is the slowest suite)
QUIET_CORES = 0.2         # before a stragglers run, wait for other processes to use less than
SETTLE_S = 60.0           # this many cores, for at most this long (--settle-s)
NOISY_CORES = 0.25        # a run during which other processes used more is run again, at most
REDOS = 2                 # this many times (--redos); the cleanest attempt counts, all are kept
MODE_FIELDS = ("staleness", "steps", "samples", "samples_per_s", "wall_s", "final_loss",
               "max_staleness")   # what the modes suite keeps of each run's summary.json


# -- child processes -------------------------------------------------------------------
def _die_with_parent() -> None:
    """Children get SIGKILL if this process dies, so a killed benchmark leaves nothing behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Children:
    """The processes one measurement starts. ``stop()`` ends every one still running."""

    def __init__(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="ps-bench-")
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> str:
        """Run ``python ARGV --endpoint-file F``; return the endpoint it publishes in F."""
        path = os.path.join(self.tmp.name, f"{name}.endpoint")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen([sys.executable, *argv, "--endpoint-file", path], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent)
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


# -- transport: raw pyzmq --------------------------------------------------------------
def raw_peer(args) -> int:
    """The raw side's echo peer: answer every message with as many bytes, 8 MiB frames."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    wire.write_endpoint(args.endpoint_file, sock.getsockopt_string(zmq.LAST_ENDPOINT))
    reply = np.zeros(0, dtype=np.uint8)
    try:
        while sock.poll(int(args.timeout_s * 1000)):
            ident, *payload = sock.recv_multipart(copy=False)
            nbytes = sum(len(f.buffer) for f in payload)
            if nbytes == 0:
                return 0                                   # the client's "stop"
            if reply.size != nbytes:
                reply = np.ones(nbytes, dtype=np.uint8)
            # The reply buffer never changes, so sending it without copy or tracking is safe.
            sock.send_multipart([ident, *wire.split(reply)], copy=False)
        return 1                                           # idle past the deadline: give up
    finally:
        sock.close(linger=0)
        ctx.term()


def raw_block(sock: zmq.Socket, frames: list, nbytes: int, rounds: int) -> float:
    """Seconds for ``rounds`` round trips of ``nbytes`` out and ``nbytes`` back."""
    t0 = time.perf_counter()
    for _ in range(rounds):
        sock.send_multipart(frames, copy=False)
        if not sock.poll(int(REQUEST_TIMEOUT_S * 1000)):
            raise TimeoutError(f"raw peer silent for {REQUEST_TIMEOUT_S:.0f} s")
        got = sum(len(f.buffer) for f in sock.recv_multipart(copy=False))
        if got != nbytes:
            raise RuntimeError(f"raw peer answered {got} bytes, expected {nbytes}")
    return time.perf_counter() - t0


# -- transport: the parameter server ---------------------------------------------------
def ps_cluster(ctx, children: Children, n: int, servers: int, steps: int):
    """Start a scheduler and S servers; register as worker 0 of an n-float model."""
    common = ["--bind", "tcp://127.0.0.1:*", "--timeout-s", str(ROLE_TIMEOUT_S)]
    # This process sends no heartbeats while it times round trips: a liveness deadline as
    # long as the run keeps the scheduler from declaring it dead.
    sched_ep = children.start("scheduler", ["-m", "ps.scheduler", "--servers", str(servers),
                                            "--workers", "1", "--mode", "bsp",
                                            "--steps", str(steps), *common,
                                            "--dead-after-s", str(ROLE_TIMEOUT_S)])
    for k in range(servers):
        children.start(f"server{k}", ["-m", "ps.server", "--scheduler", sched_ep,
                                      "--shard", str(k), *common])
    scheduler = Peer(ctx, sched_ep, "scheduler")
    # One sample per step and one task per step: the push of task t completes step t, and
    # lr 0 keeps every value fixed however many steps run.
    reply, _ = scheduler.request(
        Kind.REGISTER, START_TIMEOUT_S, role="worker", worker=0, layout=[["w", [n]]],
        dataset_size=steps, batch_size=1, shuffle=False, optimizer={"name": "sgd", "lr": 0.0},
        epochs=None, seed=0)
    shards = [ShardInfo(s["index"], s["endpoint"], s["lo"], s["hi"]) for s in reply["shards"]]
    client = ShardClient(ctx, shards, worker=0, timeout_s=REQUEST_TIMEOUT_S,
                         incarnation=reply["inc"])
    return scheduler, client


def ps_block(client: ShardClient, flat: np.ndarray, grad: np.ndarray, step: int,
             rounds: int) -> float:
    """Seconds for ``rounds`` BSP steps from ``step`` on: pull all shards, push all shards."""
    t0 = time.perf_counter()
    for t in range(step, step + rounds):
        versions = client.pull_into(flat, t)
        client.push(grad, t, tasks=[t], samples=1, step_tasks=1)
    elapsed = time.perf_counter() - t0
    if versions != [step + rounds - 1] * len(client.shards):
        raise RuntimeError(f"shards at versions {versions}, expected {step + rounds - 1}")
    return elapsed


def transport_row(n: int, servers: int, rounds: int, repeats: int) -> dict:
    """One table row: raw and ps blocks alternating on the same bytes, best of each."""
    steps = WARMUP_ROUNDS + repeats * rounds
    nbytes = 4 * n
    children, ctx = Children(), zmq.Context()
    try:
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(children.start("raw_peer", [__file__, "raw-peer",
                                                "--timeout-s", str(ROLE_TIMEOUT_S)]))
        scheduler, client = ps_cluster(ctx, children, n, servers, steps)
        flat = np.zeros(n, dtype=np.float32)               # (n,) the worker's parameters
        grad = np.ones(n, dtype=np.float32)                # (n,) the gradient it pushes
        client.init(flat)
        frames = wire.split(flat)                          # 8 MiB views, like a push
        raw_block(raw, frames, nbytes, WARMUP_ROUNDS)
        ps_block(client, flat, grad, 0, WARMUP_ROUNDS)
        raw_s, ps_s, step = [], [], WARMUP_ROUNDS
        for _ in range(repeats):
            raw_s.append(raw_block(raw, frames, nbytes, rounds))
            ps_s.append(ps_block(client, flat, grad, step, rounds))
            step += rounds
        raw.send(b"")                                      # stop the raw peer
        scheduler.request(Kind.DONE, REQUEST_TIMEOUT_S, worker=0, inc=client.inc)
        scheduler.request(Kind.FINISHED, REQUEST_TIMEOUT_S, worker=0, inc=client.inc)
        children.wait(["raw_peer", "scheduler", *(f"server{k}" for k in range(servers))],
                      EXIT_TIMEOUT_S)
    finally:
        ctx.destroy(linger=0)
        children.stop()
    moved = 2 * nbytes * rounds                            # per block: 4N pulled + 4N pushed
    ps_best, raw_best = min(ps_s), min(raw_s)
    return {"params": n, "servers": servers, "bytes_per_round": 2 * nbytes, "rounds": rounds,
            "repeats": repeats, "ps_round_trips_per_s": rounds / ps_best,
            "ps_gb_per_s": moved / ps_best / 1e9, "raw_round_trips_per_s": rounds / raw_best,
            "raw_gb_per_s": moved / raw_best / 1e9, "ps_over_raw": raw_best / ps_best,
            "ps_block_s": ps_s, "raw_block_s": raw_s}


def run_transport(args) -> tuple[list[dict], str]:
    rows = []
    for n in args.sizes:
        rounds = args.rounds or max(3, round(BLOCK_BYTES / (8 * n)))
        for servers in args.servers:
            rows.append(transport_row(n, servers, rounds, args.repeats))
            print(f"  {count(n)} x {servers} servers done", file=sys.stderr, flush=True)
    table = markdown(
        ["params", "servers", "MB / round trip", "rounds", "ps round trips/s", "ps GB/s",
         "raw round trips/s", "raw GB/s", "ps / raw"],
        [[count(r["params"]), r["servers"], f"{r['bytes_per_round'] / 1e6:g}", r["rounds"],
          f"{r['ps_round_trips_per_s']:.1f}", f"{r['ps_gb_per_s']:.2f}",
          f"{r['raw_round_trips_per_s']:.1f}", f"{r['raw_gb_per_s']:.2f}",
          f"{r['ps_over_raw']:.2f}"] for r in rows])
    note = (f"Best of {args.repeats} alternating raw/ps blocks per row; a round trip moves "
            "2 x 4N bytes (pull N float32 + push N float32).")
    return rows, table + "\n\n" + note


# -- launcher runs (modes, stragglers) ---------------------------------------------------
LAUNCHERS: set[int] = set()   # process groups of the launcher runs in progress


def kill_group(pgid: int) -> None:
    """SIGKILL a launcher and every role it started (they share its process group)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch_run(argv: list[str], out: str, what: str, lenient: bool = False) -> dict:
    """One ``python -m ps.launch ARGV --quiet --out OUT`` run; its summary.json.

    The launcher gets its own process group, killed afterwards whatever happened, so a
    failed or timed-out run leaves no role behind. ``lenient``: a launcher that failed
    after the scheduler wrote a successful summary (a role slow to exit) still counts;
    the summary gets ``launcher_error`` with the launcher's complaint."""
    cmd = [sys.executable, "-m", "ps.launch", *argv, "--quiet", "--out", out]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    LAUNCHERS.add(proc.pid)
    try:
        _, stderr = proc.communicate(timeout=MODE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} run did not finish in {MODE_TIMEOUT_S:.0f} s") from None
    finally:
        kill_group(proc.pid)
        proc.wait()
        LAUNCHERS.discard(proc.pid)
    summary = None
    if os.path.exists(os.path.join(out, "summary.json")):
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
    if proc.returncode != 0:
        if not (lenient and summary and summary.get("ok")):
            raise RuntimeError(f"{what} run failed ({proc.returncode}):\n{stderr[-2000:]}")
        summary["launcher_error"] = stderr.strip().splitlines()[-1:]
        print(f"  warning: {what} run: launcher exited {proc.returncode} after a successful "
              f"run: {summary['launcher_error']}", file=sys.stderr, flush=True)
    return summary


# -- modes -----------------------------------------------------------------------------
def mode_run(mode: str, steps: int | None, out: str) -> dict:
    """One ``ps.launch`` run of the MLP example; its summary.json."""
    argv = ["--job", MLP_JOB, "--mode", mode, "--workers", "2", "--servers", "2"]
    argv += ["--staleness", "2"] if mode == "ssp" else []
    argv += ["--steps", str(steps)] if steps else []
    return launch_run(argv, out, mode)


def run_modes(args) -> tuple[list[dict], str]:
    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    with tempfile.TemporaryDirectory(prefix="ps-bench-modes-") as tmp:
        for rep in range(args.repeats):                    # modes alternate within each repeat
            for mode in args.modes:
                runs[mode].append(mode_run(mode, args.steps, os.path.join(tmp, f"{mode}{rep}")))
                print(f"  {mode} run {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    rows = []
    for mode, summaries in runs.items():
        speeds = [s["samples_per_s"] for s in summaries]
        median = summaries[speeds.index(statistics.median_low(speeds))]
        rows.append({"mode": mode, **{k: median[k] for k in MODE_FIELDS},
                     "samples_per_s_runs": speeds})
    table = markdown(
        ["mode", "staleness bound", "steps", "samples", "samples/s", "wall s", "final loss",
         "max staleness"],
        [[r["mode"], r["staleness"] if r["mode"] == "ssp" else "-", r["steps"], r["samples"],
          f"{r['samples_per_s']:,.0f}", f"{r['wall_s']:.2f}",
          "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}", r["max_staleness"]]
         for r in rows])
    note = (f"MLP example, 2 workers x 2 servers; median of {args.repeats} runs per mode "
            "(modes alternate within each repeat).")
    return rows, table + "\n\n" + note


# -- stragglers ------------------------------------------------------------------------
def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine since boot, CPU seconds of this process and
    of its children that have exited), or None where /proc/stat is missing (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)       # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")     # up to steal, no guest
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def other_load(before, after, wall_s: float) -> float | None:
    """Cores' worth of CPU that processes outside this benchmark used between two
    ``cpu_seconds()`` readings: the noise a run on a shared machine suffered. Our
    launcher's roles count as ours once they exited (the launcher waits for them)."""
    if before is None or after is None or wall_s <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall_s)


def settle(max_wait_s: float) -> tuple[float, float | None]:
    """Wait, at most ``max_wait_s``, until other processes use under QUIET_CORES for a
    whole second: a run that starts while another job computes measures that job.
    Returns (seconds waited, other load of the last second)."""
    t0 = time.monotonic()
    while True:
        before = cpu_seconds()
        time.sleep(1.0)
        load = other_load(before, cpu_seconds(), 1.0)
        waited = time.monotonic() - t0
        if load is None or load < QUIET_CORES or waited >= max_wait_s:
            return waited, load


def straggler_run(out: str, workers: int, steal: bool, steps: int, mode: str = "bsp",
                  slow: bool = False, jitter: bool = False, trace: bool = False,
                  settle_s: float = 0.0) -> dict:
    """One launcher run of the compute-bound job; what the suite keeps of it."""
    argv = ["--job", STRAGGLER_JOB, "--workers", str(workers), "--servers", "1",
            "--threads", "1", "--mode", mode, "--steps", str(steps)]
    argv += ["--staleness", "2"] if mode == "ssp" else []
    argv += [] if steal else ["--no-steal"]
    argv += ["--slow", f"1={SLOW_FACTOR:g}"] if slow else []
    argv += ["--jitter", JITTER] if jitter else []
    argv += ["--trace"] if trace else []
    waited, load_before = settle(settle_s) if settle_s > 0 else (0.0, None)
    t0, cpu0 = time.monotonic(), cpu_seconds()
    summary = launch_run(argv, out, f"{mode} {workers} workers", lenient=True)
    load = other_load(cpu0, cpu_seconds(), time.monotonic() - t0)
    keep = ("samples", "tasks", "compute_s", "stolen_by", "stolen_from")
    run = {"argv": argv, "samples_per_s": summary["samples_per_s"], "wall_s": summary["wall_s"],
           "samples": summary["samples"], "final_loss": summary["final_loss"],
           "losses": summary["losses"], "other_load_cores": load,
           "settle_s": waited, "other_load_before": load_before,
           "per_worker": [{k: w[k] for k in keep} for w in summary["per_worker"]],
           "launcher_error": summary.get("launcher_error")}
    if trace:
        run["step_end_s"] = step_end_times(os.path.join(out, "trace.json"))
    return run


def step_end_times(path: str) -> dict[int, float]:
    """When each step's last push (one that carried tasks) ended, in seconds from the
    first worker event of the trace: the moment the step's loss exists. In SSP a clock's
    push is tagged with the clock, in ASP with the task's step: the same keys the
    summary's losses are kept under."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    workers = {e["pid"] for e in events
               if e["ph"] == "M" and e["args"]["name"].startswith("worker")}
    spans = [e for e in events if e["ph"] == "X" and e["pid"] in workers]
    t0 = min(e["ts"] for e in spans)
    ends: dict[int, float] = {}
    for e in spans:
        if e["name"] == "push" and e["args"].get("tasks", 0) > 0:
            step, end = e["args"]["step"], (e["ts"] + e["dur"] - t0) / 1e6
            ends[step] = max(ends.get(step, 0.0), end)
    return ends


def time_to_target(run: dict, target: float) -> tuple[float | None, int | None, bool]:
    """(seconds, step, estimated) of the earliest step whose loss is below ``target``.

    The summary's losses are per step with samples, in step order; the trace says when
    each such step ended. Where the two disagree in length (they should not), the step's
    time is estimated as wall_s x (i + 1) / len(losses) and ``estimated`` is True."""
    losses, ends = run["losses"], run.get("step_end_s", {})
    steps = sorted(ends)
    estimated = len(steps) != len(losses)
    hits = []
    for i, loss in enumerate(losses):
        if loss < target:
            at = run["wall_s"] * (i + 1) / len(losses) if estimated else ends[steps[i]]
            hits.append((at, steps[i] if not estimated else i))
    if not hits:
        return None, None, estimated
    at, step = min(hits)                   # ASP may finish steps out of order: earliest in time
    return at, step, estimated


def s_per_sample(run: dict) -> float:
    """Compute seconds per sample over a run's workers (their own measure, compute_s)."""
    return sum(w["compute_s"] for w in run["per_worker"]) / run["samples"]


def run_stragglers(args) -> tuple[list[dict], str]:
    plan = []                                # (cell, run kwargs), in the order they run
    for rep in range(args.repeats):          # stealing and static alternate: A B A B ...
        for w in args.workers:
            for section, slow in (("no_slow_worker", False), ("slow_worker", True)):
                for steal in (True, False):
                    plan.append(((section, w, steal),
                                 dict(workers=w, steal=steal, steps=args.steps, slow=slow)))
        for mode in args.modes:
            for steal in (True, False):
                plan.append((("jitter", mode, steal),
                             dict(workers=2, steal=steal, mode=mode, jitter=True, trace=True,
                                  steps=args.target_steps[mode])))
    with tempfile.TemporaryDirectory(prefix="ps-bench-stragglers-") as tmp:
        runs_dir = args.runs_dir or tmp

        def measure(i: int) -> dict:
            cell, kwargs = plan[i]
            name = "-".join(str(k) for k in cell)
            attempts = []
            while True:
                run = straggler_run(os.path.join(runs_dir, f"{i:03d}-{name}-{len(attempts)}"),
                                    settle_s=args.settle_s, **kwargs)
                attempts.append(run)
                load = run["other_load_cores"] or 0.0
                print(f"  [{i + 1}/{len(plan)}] {name}: {run['samples_per_s']:,.0f} samples/s, "
                      f"other load {load:.2f} cores", file=sys.stderr, flush=True)
                if load <= NOISY_CORES or len(attempts) > args.redos:
                    break
                print("    noisy: again", file=sys.stderr, flush=True)
            best = min(attempts, key=lambda r: r["other_load_cores"] or 0.0)   # the cleanest
            return best | {"noisy_attempts": [r for r in attempts if r is not best]}

        if args.parallel <= 1:
            results = [measure(i) for i in range(len(plan))]
        else:       # --tiny: overlapping runs are quicker, and useless for timing
            pool = ThreadPoolExecutor(max_workers=args.parallel)
            try:
                results = list(pool.map(measure, range(len(plan))))
            finally:                         # on SIGTERM or a failed run: stop the others now
                for pgid in list(LAUNCHERS):
                    kill_group(pgid)
                pool.shutdown(wait=True, cancel_futures=True)
    cells: dict[tuple, list[dict]] = {}
    for (cell, _), run in zip(plan, results):
        cells.setdefault(cell, []).append(run)
    rows = straggler_rows(cells, args)
    return rows, straggler_tables(rows, args)


def straggler_rows(cells: dict, args) -> list[dict]:
    med = lambda runs, key: statistics.median(r[key] for r in runs)         # noqa: E731
    loads = lambda runs: [r["other_load_cores"] for r in runs]              # noqa: E731
    rows = []
    for w in args.workers:
        steal, static = cells[("no_slow_worker", w, True)], cells[("no_slow_worker", w, False)]
        cost = 1.0 - med(steal, "samples_per_s") / med(static, "samples_per_s")
        rows.append({"section": "no_slow_worker", "workers": w,
                     "steal_samples_per_s": med(steal, "samples_per_s"),
                     "static_samples_per_s": med(static, "samples_per_s"),
                     "steal_cost": cost, "meets_target": cost <= 0.05,
                     "tasks_stolen": [sum(x["stolen_by"] for x in r["per_worker"]) for r in steal],
                     "s_per_sample": statistics.median(map(s_per_sample, steal + static)),
                     "steal_runs": steal, "static_runs": static,
                     "other_load_cores": loads(steal + static)})
    for w, base in zip(args.workers, rows):
        steal, static = cells[("slow_worker", w, True)], cells[("slow_worker", w, False)]
        ratio = med(steal, "samples_per_s") / med(static, "samples_per_s")
        c = base["s_per_sample"]                # an unslowed worker's compute s per sample
        samples = steal[0]["samples"]
        ideal = samples * c / ((w - 1) + 1 / SLOW_FACTOR)
        # The same, with the speeds the stealing runs themselves measured (the slow worker's
        # compute_s includes its sleeps): what a perfect dealer would have done in that run.
        in_run = statistics.median(r["samples"] / sum(x["samples"] / x["compute_s"]
                                                      for x in r["per_worker"]) for r in steal)
        wall = med(steal, "wall_s")
        rows.append({"section": "slow_worker", "workers": w, "slow_factor": SLOW_FACTOR,
                     "steal_samples_per_s": med(steal, "samples_per_s"),
                     "static_samples_per_s": med(static, "samples_per_s"),
                     "steal_over_static": ratio, "target_ratio": 1.6 if w <= 2 else 2.0,
                     "steal_wall_s": wall, "ideal_s": ideal, "wall_over_ideal": wall / ideal,
                     "in_run_ideal_s": in_run, "wall_over_in_run_ideal": wall / in_run,
                     "slow_worker_task_share": statistics.median(
                         r["per_worker"][1]["tasks"] / sum(x["tasks"] for x in r["per_worker"])
                         for r in steal),
                     "steal_runs": steal, "static_runs": static,
                     "other_load_cores": loads(steal + static)})
        rows[-1]["meets_target"] = ratio >= rows[-1]["target_ratio"] and wall / ideal <= 1.2
    for mode in args.modes:
        row = {"section": "jitter", "mode": mode, "workers": 2, "jitter": JITTER,
               "target_loss": args.target_loss, "steps": args.target_steps[mode]}
        for side, steal in (("steal", True), ("static", False)):
            runs = cells[("jitter", mode, steal)]
            hits = [time_to_target(r, args.target_loss) for r in runs]
            times = [h[0] for h in hits]
            row[f"{side}_s_to_target"] = (statistics.median(times) if None not in times
                                          else None)        # None: some run never got there
            row[f"{side}_step_at_target"] = [h[1] for h in hits]
            row[f"{side}_estimated"] = any(h[2] for h in hits)
            row[f"{side}_samples_per_s"] = med(runs, "samples_per_s")
            row[f"{side}_final_loss"] = med(runs, "final_loss")
            row[f"{side}_runs"] = runs
        row["other_load_cores"] = loads(row["steal_runs"] + row["static_runs"])
        both = row["steal_s_to_target"] and row["static_s_to_target"]
        row["static_over_steal"] = (row["static_s_to_target"] / row["steal_s_to_target"]
                                    if both else None)
        rows.append(row)
    return rows


def straggler_tables(rows: list[dict], args) -> str:
    def load(r):
        vals = [x for x in r["other_load_cores"] if x is not None]
        return f"{statistics.median(vals):.2f} (max {max(vals):.2f})" if vals else "-"

    yes = lambda ok: "yes" if ok else "**no**"                              # noqa: E731
    secs = lambda x: "not reached" if x is None else f"{x:.2f}"              # noqa: E731
    section = lambda name: [r for r in rows if r["section"] == name]         # noqa: E731
    a = markdown(
        ["workers", "steal samples/s", "static samples/s", "steal / static (target)",
         "steal wall s", "ideal s", "wall / ideal (target <= 1.2)", "wall / in-run ideal",
         "slow worker's task share", "other load, cores"],
        [[r["workers"], f"{r['steal_samples_per_s']:,.0f}", f"{r['static_samples_per_s']:,.0f}",
          f"{r['steal_over_static']:.2f} (>= {r['target_ratio']:g}: "
          f"{yes(r['steal_over_static'] >= r['target_ratio'])})",
          f"{r['steal_wall_s']:.2f}", f"{r['ideal_s']:.2f}",
          f"{r['wall_over_ideal']:.2f} ({yes(r['wall_over_ideal'] <= 1.2)})",
          f"{r['wall_over_in_run_ideal']:.2f}", f"{r['slow_worker_task_share']:.0%}", load(r)]
         for r in section("slow_worker")])
    b = markdown(
        ["workers", "steal samples/s", "static samples/s", "cost of stealing (target <= 5%)",
         "tasks stolen per run", "compute ms per sample", "other load, cores"],
        [[r["workers"], f"{r['steal_samples_per_s']:,.0f}", f"{r['static_samples_per_s']:,.0f}",
          f"{r['steal_cost']:+.1%} ({yes(r['meets_target'])})",
          ", ".join(map(str, r["tasks_stolen"])), f"{r['s_per_sample'] * 1e3:.3f}", load(r)]
         for r in section("no_slow_worker")])
    jit = section("jitter")
    c = markdown(
        ["mode", "steps", f"steal: s to loss < {args.target_loss:g}",
         f"static: s to loss < {args.target_loss:g}", "static / steal",
         "step reached (steal; static)", "steal samples/s", "static samples/s",
         "final loss (steal; static)", "other load, cores"],
        [[r["mode"] + ("(2)" if r["mode"] == "ssp" else ""), r["steps"],
          secs(r["steal_s_to_target"]), secs(r["static_s_to_target"]),
          "-" if r["static_over_steal"] is None else f"{r['static_over_steal']:.2f}",
          f"{r['steal_step_at_target']}; {r['static_step_at_target']}",
          f"{r['steal_samples_per_s']:,.0f}", f"{r['static_samples_per_s']:,.0f}",
          f"{r['steal_final_loss']:.3f}; {r['static_final_loss']:.3f}", load(r)] for r in jit])
    cores = os.cpu_count() or 0
    over = [w for w in args.workers if w > cores]
    redone = sum(len(run["noisy_attempts"]) for r in rows
                 for run in r["steal_runs"] + r["static_runs"])
    notes = [
        f"Compute-bound job (scripts/jobs/compute_bound.py), 1 server, --threads 1, "
        f"{args.steps} BSP steps, worker 1 {SLOW_FACTOR:g}x slow (--slow 1={SLOW_FACTOR:g}); "
        "static = --no-steal. ideal = samples x c / ((workers - 1) + 1/3), c = compute s per "
        "sample in (b)'s runs; in-run ideal: the same with the speeds the stealing runs "
        "measured themselves (samples / compute_s per worker, the slow one's sleeps included)."
        + (f" This machine has {cores} cores, so {', '.join(map(str, over))} workers "
           "oversubscribe it: a worker's speed depends on what the others do (c, measured "
           "while all compute, is slower than a fast worker's while the slow one sleeps)."
           if over else ""),
        "No slow worker, otherwise as (a). Cost = 1 - steal / static samples/s (negative: "
        "stealing was faster).",
        f"--jitter {JITTER}: any task 3x slow with p = 0.2 (the same tasks in every run), "
        "2 workers. Time = end of the last push of the first step whose loss (the summary's "
        "per-step mean) is below the target, taken from the run's --trace and counted from "
        "its first worker event; step reached: that step, per run."
        + (" Some step times are estimates (wall_s x (i + 1) / steps): the trace and the "
           "losses disagreed." if any(r["steal_estimated"] or r["static_estimated"]
                                      for r in jit) else "")]
    titles = (f"(a) BSP, worker 1 {SLOW_FACTOR:g}x slow: stealing vs static dealing",
              "(b) BSP, no slow worker: what stealing costs",
              f"(c) --jitter {JITTER}: time to reach a loss")
    footer = (f"Medians of {args.repeats} runs per cell, stealing and static alternating. Other "
              "load: CPU that processes outside the benchmark used during the runs (median, "
              f"max); {redone} run(s) were repeated because it passed {NOISY_CORES:g} cores.")
    return "\n\n".join([f"**{title}**\n\n{table}\n\n{note}"
                        for title, table, note in zip(titles, (a, b, c), notes)] + [footer])


# -- output and flags ------------------------------------------------------------------
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="suite", required=True, metavar="{transport,modes,stragglers}")
    t = sub.add_parser("transport", help="pull+push round trips vs raw pyzmq on the same bytes")
    t.add_argument("--sizes", type=counts, default=None,
                   help="parameter counts, float32 (default 1M,10M,25M; --tiny: 100K)")
    t.add_argument("--servers", type=lambda text: [int(x) for x in text.split(",")],
                   default=[2], help="server counts (default 2)")
    t.add_argument("--rounds", type=int, default=None,
                   help=f"round trips per timed block (default: ~{BLOCK_BYTES / 1e9:.1f} GB "
                        "worth, at least 3; --tiny: 3)")
    m = sub.add_parser("modes", help="samples/s of the MLP example in BSP, SSP(2) and ASP")
    m.add_argument("--steps", type=int, default=None,
                   help="global steps per run (default: the job's 20 epochs; --tiny: 3)")
    m.add_argument("--modes", type=lambda s: s.split(","), default=["bsp", "ssp", "asp"],
                   help="modes to run (default bsp,ssp,asp)")
    g = sub.add_parser("stragglers", help="work stealing vs static dealing: a slow worker, jitter")
    g.add_argument("--workers", type=lambda text: [int(x) for x in text.split(",")],
                   default=None, help="worker counts of the throughput runs (default 2,4; "
                                      "--tiny: 2)")
    g.add_argument("--steps", type=int, default=None,
                   help=f"BSP steps of a throughput run (default {THROUGHPUT_STEPS}; --tiny: 2)")
    g.add_argument("--modes", type=lambda s: s.split(","), default=["bsp", "ssp", "asp"],
                   help="modes of the time-to-target runs (default bsp,ssp,asp)")
    g.add_argument("--target-loss", type=float, default=None,
                   help=f"loss of the time-to-target runs (default {TARGET_LOSS:g}; --tiny: 3, "
                        "which step 0 reaches)")
    g.add_argument("--parallel", type=int, default=None,
                   help="runs at a time (default 1: anything else spoils the timing; --tiny: 2)")
    g.add_argument("--settle-s", type=float, default=None,
                   help=f"before each run, wait up to this long for other processes to use "
                        f"< {QUIET_CORES:g} cores (default {SETTLE_S:g}; --tiny: 0)")
    g.add_argument("--redos", type=int, default=None,
                   help=f"times a run is repeated when other processes used > {NOISY_CORES:g} "
                        f"cores during it (default {REDOS}; --tiny: 0)")
    g.add_argument("--runs-dir", default=None,
                   help="keep every run's directory (summary.json, trace.json) here")
    for s in (t, m, g):
        s.add_argument("--repeats", type=int, default=None,
                       help=f"timed blocks or runs per row (default {REPEATS}, stragglers "
                            f"{STRAGGLER_REPEATS}; --tiny: 1)")
        s.add_argument("--tiny", action="store_true", help="a few-second smoke run (for CI)")
        s.add_argument("--json", default=None, help="output file (default bench/<suite>.json)")
    r = sub.add_parser("raw-peer")          # internal: the raw side's echo process
    r.add_argument("--endpoint-file", required=True)
    r.add_argument("--timeout-s", type=float, default=ROLE_TIMEOUT_S)
    args = p.parse_args(argv)
    if args.suite == "transport":
        args.sizes = args.sizes or ([100_000] if args.tiny else [10**6, 10**7, 25 * 10**6])
        args.rounds = args.rounds or (3 if args.tiny else None)
    elif args.suite == "modes":
        args.steps = args.steps or (3 if args.tiny else None)
    elif args.suite == "stragglers":
        args.workers = args.workers or ([2] if args.tiny else [2, 4])
        args.steps = args.steps or (2 if args.tiny else THROUGHPUT_STEPS)
        args.target_steps = {m: 2 if args.tiny else TARGET_STEPS.get(m, args.steps)
                             for m in args.modes}
        args.target_loss = args.target_loss or (3.0 if args.tiny else TARGET_LOSS)
        args.parallel = args.parallel or (2 if args.tiny else 1)
        if args.settle_s is None:
            args.settle_s = 0.0 if args.tiny else SETTLE_S
        if args.redos is None:
            args.redos = 0 if args.tiny else REDOS
        if any(w < 2 for w in args.workers):
            p.error("--workers: the slow worker is worker 1, so at least 2 workers")
    if args.suite != "raw-peer":
        default = STRAGGLER_REPEATS if args.suite == "stragglers" else REPEATS
        args.repeats = args.repeats or (1 if args.tiny else default)
        args.json = args.json or os.path.join("bench", f"{args.suite}.json")
    return args


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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.suite == "raw-peer":
        return raw_peer(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the finally blocks
    suites = {"transport": run_transport, "modes": run_modes, "stragglers": run_stragglers}
    rows, table = suites[args.suite](args)
    print(table)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(),
               "python": platform.python_version(), "numpy": np.__version__,
               "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), **source_state()}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"suite": args.suite, "command": sys.argv, "machine": machine, "rows": rows},
                  f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
