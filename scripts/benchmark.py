"""Benchmarks: how fast the data path moves parameters, and how fast each mode trains.

    python scripts/benchmark.py transport [--sizes 1M,10M,25M] [--servers 1,2] [--rounds N]
    python scripts/benchmark.py modes [--steps K] [--repeats N]
    (either with --tiny: a few-second run that shows the suite works; --json F: where to write)

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
    sched_ep = children.start("scheduler", ["-m", "ps.scheduler", "--servers", str(servers),
                                            "--workers", "1", "--mode", "bsp",
                                            "--steps", str(steps), *common])
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
    client = ShardClient(ctx, shards, worker=0, timeout_s=REQUEST_TIMEOUT_S)
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
        scheduler.request(Kind.DONE, REQUEST_TIMEOUT_S, worker=0)
        scheduler.request(Kind.FINISHED, REQUEST_TIMEOUT_S, worker=0)
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


# -- modes -----------------------------------------------------------------------------
def mode_run(mode: str, steps: int | None, out: str) -> dict:
    """One ``ps.launch`` run of the MLP example; its summary.json."""
    cmd = [sys.executable, "-m", "ps.launch", "--job", MLP_JOB, "--mode", mode, "--workers", "2",
           "--servers", "2", "--quiet", "--out", out]
    cmd += ["--staleness", "2"] if mode == "ssp" else []
    cmd += ["--steps", str(steps)] if steps else []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=MODE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{mode} run did not finish in {MODE_TIMEOUT_S:.0f} s") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)            # the launcher and all it started
        except ProcessLookupError:
            pass
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed ({proc.returncode}):\n{stderr[-2000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


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
    sub = p.add_subparsers(dest="suite", required=True, metavar="{transport,modes}")
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
    for s in (t, m):
        s.add_argument("--repeats", type=int, default=None,
                       help=f"timed blocks or runs per row (default {REPEATS}; --tiny: 1)")
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
    if args.suite != "raw-peer":
        args.repeats = args.repeats or (1 if args.tiny else REPEATS)
        args.json = args.json or os.path.join("bench", f"{args.suite}.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.suite == "raw-peer":
        return raw_peer(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the finally blocks
    rows, table = (run_transport if args.suite == "transport" else run_modes)(args)
    print(table)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(),
               "python": platform.python_version(), "numpy": np.__version__,
               "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"suite": args.suite, "command": sys.argv, "machine": machine, "rows": rows},
                  f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
