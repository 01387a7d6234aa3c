"""Suite ``scale``: step time against model size, servers and workers; server memory.

Launcher runs (BSP, --trace) of the MLP of scripts/jobs/mlp10m.py resized to N
parameters (a two-line job file sets its width, ``sized_job``), global batch --batch:
(a) sizes 1M-100M with 2 servers and 2 workers; (b) 1-4 servers at 10M with 2
workers; (c) 1-4 workers at 10M with 2 servers (a configuration in several sweeps runs
once). Step time: ``--warmup`` steps first, then the mean over the timed steps, from
the run's trace (the end of each step's last push).

Memory: while a run goes on, each server's VmRSS and VmHWM are read from
/proc/PID/status every POLL_S (pids from OUT/cluster.json, written by the launcher);
the last reading before the last step ended (its time from the trace) is the end of
the run: a server frees its shard when told to stop, before it exits. Per server,
(RSS - idle) / (4 x shard parameters) is its memory per parameter byte, where idle is
the RSS of a server process that has started and bound but holds no shard. Beside it,
the bytes per parameter byte each shard reports holding (``Shard.state_bytes``, in the
run's summary), and the issue's bound: parameters + optimizer state + one aggregation
buffer, plus a constant (the optimizer's scratch chunks). RSS counts what is resident
at the end; HWM the peak, which adds whatever was in flight (received gradient frames
not yet summed, a parameter copy made while a pull's reply was still being sent).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

from .common import (ROOT, Children, RoleMemory, count, counts, ints, launch_run, markdown,
                     proc_status, step_end_times, timed_step_s)

MLP_JOB = os.path.join(ROOT, "scripts", "jobs", "mlp10m.py")
SIZES = [10**6, 10**7, 30 * 10**6, 10**8]     # (a) parameters
TINY_SIZES = [100_000]     # --tiny: (a) is the one size of (b) and (c)
SWEEP_SIZE = 10**7        # (b), (c): the model of the server and worker sweeps
TINY_SWEEP_SIZE = 100_000
SERVERS = [1, 2, 4]       # (b)
WORKERS = [1, 2, 4]       # (c)
BATCH = 64                # global batch: small, so moving parameters weighs as much as compute
STEPS, WARMUP = 4, 1      # timed steps after warm-up steps (--tiny: 1 and 1); one warm-up
                          # step is enough: timing starts when it ends, connections made
POLL_S = 0.1              # how often server memory is read during a run
DEAD_AFTER_S = 60.0       # liveness deadline of the runs: at 100M a server's loop can be busy
                          # with one message for longer than the 3 s default on a loaded
                          # 2-core machine, and would be declared dead (measured: 30M passed,
                          # 100M failed with "server 0 silent for 3.0 s")
IDLE_SETTLE_S = 0.5       # an idle server is read this long after it bound


def sized_job(folder: str, params: int, batch: int | None = None) -> str:
    """Write a job file: mlp10m.py at about ``params`` parameters; return its path."""
    path = os.path.join(folder, f"mlp_{count(params)}.py")
    batch_line = f"BATCH_SIZE = {batch}\n" if batch else ""
    with open(path, "w") as f:
        f.write(f'"""mlp10m.py resized to ~{count(params)} parameters (benchmark)."""\n'
                "import importlib.util\n"
                f"_spec = importlib.util.spec_from_file_location('mlp10m', {MLP_JOB!r})\n"
                "base = importlib.util.module_from_spec(_spec)\n"
                "_spec.loader.exec_module(base)\n"
                f"base.HIDDEN = base.hidden_for({params})   # read by build_model when called\n"
                "build_model, build_dataset, loss_fn = "
                "base.build_model, base.build_dataset, base.loss_fn\n"
                "OPTIMIZER, BATCH_SIZE, SHUFFLE = base.OPTIMIZER, base.BATCH_SIZE, base.SHUFFLE\n"
                + batch_line)
    return path


def idle_server_rss() -> int:
    """RSS of a server that has imported everything and bound, but holds no shard."""
    children = Children()
    try:
        # Nobody listens at the scheduler endpoint: the server binds, then waits to register.
        children.start("idle_server", ["-m", "ps.server", "--scheduler", "tcp://127.0.0.1:9",
                                       "--timeout-s", "30"])
        time.sleep(IDLE_SETTLE_S)
        return proc_status(children.procs["idle_server"].pid)["VmRSS"]
    finally:
        children.stop()


def shard_bytes_per_param_byte(optimizer: dict) -> tuple[dict[str, float], int]:
    """Arrays a BSP ``Shard`` holds (``Shard.state_bytes``), by name, in bytes per byte
    of its parameters, and its constant scratch in bytes (read off a Shard of a few
    optimizer chunks after one step)."""
    from ps.core.optim import CHUNK
    from ps.core.shard import Shard
    size = 4 * CHUNK
    shard = Shard(size, optimizer, "bsp", 0, 1)
    shard.init([np.zeros(size, np.float32)])
    shard.push(0, 0, [0], 1, 1, [np.ones(size, np.float32)])
    held = shard.state_bytes()
    scratch = held.pop("scratch")
    return {k: v / (4 * size) for k, v in held.items()}, scratch


def scale_run(job: str, params: int, servers: int, workers: int, steps: int, warmup: int,
              out: str) -> dict:
    """One launcher run; step time from its trace, each server's memory at its end."""
    argv = ["--job", job, "--mode", "bsp", "--servers", str(servers), "--workers", str(workers),
            "--steps", str(warmup + steps), "--trace", "--dead-after-s", str(DEAD_AFTER_S)]
    with RoleMemory(out, prefix="server", poll_s=POLL_S) as memory:
        summary = launch_run(argv, out, f"{count(params)} x {servers} servers x {workers} "
                                        "workers", lenient=True)
    trace = os.path.join(out, "trace.json")
    step_s = timed_step_s(step_end_times(trace), warmup)
    end = max(step_end_times(trace, absolute=True).values())   # the last step's last push
    return {"step_s": step_s, "samples_per_s": summary["samples"] / summary["steps"] / step_s,
            "wall_s": summary["wall_s"], "final_loss": summary["final_loss"],
            "server_memory": [memory.at(f"server{k}", end) for k in range(servers)],
            "state_bytes": [sh.get("state_bytes", {}) for sh in summary["shards"]]}


def run(args) -> tuple[list[dict], str]:
    sys.path.insert(0, os.path.dirname(MLP_JOB))
    import mlp10m                                  # the architecture's exact parameter count
    from ps.core.sharding import cut
    configs: dict[tuple[int, int, int], list[str]] = {}    # (size, servers, workers) -> sweeps
    for size in args.sizes:
        configs.setdefault((size, 2, 2), []).append("size")
    for s in args.servers:
        configs.setdefault((args.sweep_size, s, 2), []).append("servers")
    for w in args.workers:
        configs.setdefault((args.sweep_size, 2, w), []).append("workers")
    idle = idle_server_rss()
    held, scratch = shard_bytes_per_param_byte(mlp10m.OPTIMIZER)
    # The bound: parameters, the aggregation buffer and the optimizer's state
    # (the optimizer's scratch is the constant beside it).
    target = sum(v for k, v in held.items() if k in ("params", "aggregation")
                 or k.startswith("optimizer."))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ps-bench-scale-") as tmp:
        for i, ((size, servers, workers), sweeps) in enumerate(configs.items()):
            job = sized_job(tmp, size, args.batch)
            r = scale_run(job, size, servers, workers, args.steps, args.warmup,
                          os.path.join(tmp, f"run{i}"))
            total = mlp10m.param_count(mlp10m.hidden_for(size))
            shards = [hi - lo for lo, hi in cut(total, servers)]
            per_server = []
            for k, (mem, n, state) in enumerate(zip(r.pop("server_memory"), shards,
                                                    r.pop("state_bytes"))):
                rss, hwm = mem.get("VmRSS", 0), mem.get("VmHWM", 0)
                per_server.append({"server": k, "shard_params": n, "rss_bytes": rss,
                                   "hwm_bytes": hwm, "rss_per_param_byte": (rss - idle) / (4 * n),
                                   "hwm_per_param_byte": (hwm - idle) / (4 * n),
                                   "state_bytes": state,
                                   "state_per_param_byte": sum(state.values()) / (4 * n)})
            rows.append({"sweeps": sweeps, "params": total, "nominal_params": size,
                         "servers": servers, "workers": workers, "batch": args.batch,
                         "steps": args.steps, "warmup": args.warmup, **r,
                         "rss_per_param_byte": max(s["rss_per_param_byte"] for s in per_server),
                         "hwm_per_param_byte": max(s["hwm_per_param_byte"] for s in per_server),
                         "state_per_param_byte": max(s["state_per_param_byte"]
                                                     for s in per_server),
                         "expected_per_param_byte": sum(held.values()),
                         "target_per_param_byte": target, "idle_server_rss_bytes": idle,
                         "scratch_bytes": scratch,
                         "shard_arrays_per_param_byte": held, "per_server": per_server})
            print(f"  [{i + 1}/{len(configs)}] {count(size)} x {servers} servers x {workers} "
                  f"workers: {r['step_s'] * 1e3:.0f} ms/step", file=sys.stderr, flush=True)
    return rows, tables(rows, args, idle, held, target, scratch)


def tables(rows: list[dict], args, idle: int, held: dict, target: float, scratch: int) -> str:
    headers = ["params", "servers", "workers", "step ms", "samples/s", "MB moved / step",
               "server RSS MB (max)", "RSS per param byte", "HWM per param byte",
               "state per param byte"]

    def line(r):
        moved = 2 * 4 * r["params"] * r["workers"]       # each worker pulls and pushes it all
        return [count(r["nominal_params"]), r["servers"], r["workers"],
                f"{r['step_s'] * 1e3:.1f}", f"{r['samples_per_s']:,.0f}", f"{moved / 1e6:,.0f}",
                f"{max(s['rss_bytes'] for s in r['per_server']) / 1e6:,.0f}",
                f"{r['rss_per_param_byte']:.2f}", f"{r['hwm_per_param_byte']:.2f}",
                f"{r['state_per_param_byte']:.2f}"]

    parts = []
    for sweep, title in (("size", "(a) model size, 2 servers x 2 workers"),
                         ("servers", f"(b) servers, {count(args.sweep_size)} x 2 workers"),
                         ("workers", f"(c) workers, {count(args.sweep_size)} x 2 servers")):
        parts.append(f"**{title}**\n\n" + markdown(headers, [line(r) for r in rows
                                                             if sweep in r["sweeps"]]))
    kept = ", ".join(f"{k} {v:g}" for k, v in held.items())
    parts.append(
        f"BSP, global batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps; "
        "MB moved: pulls + pushes of all workers in one step. Memory per parameter byte = "
        f"(server RSS - {idle / 1e6:.0f} MB of an idle server) / 4 x shard parameters "
        "(the largest over servers). State: the arrays a shard reports holding "
        "(Shard.state_bytes), per parameter byte: "
        f"{kept} = {sum(held.values()):g}, plus {scratch / 1024:.0f} KiB of optimizer scratch "
        "per shard; the bound parameters + optimizer state + one aggregation buffer is "
        f"{target:g}. RSS above state is in-flight message frames and heap. Small models "
        "read high: the constant part of a server's heap is divided by few bytes.")
    return "\n\n".join(parts)


def add_arguments(p) -> None:
    p.add_argument("--sizes", type=counts, default=None,
                   help="(a) parameter counts (default 1M,10M,30M,100M; --tiny: 100K)")
    p.add_argument("--servers", type=ints, default=None,
                   help="(b) server counts (default 1,2,4; --tiny: 1,2)")
    p.add_argument("--workers", type=ints, default=None,
                   help="(c) worker counts (default 1,2,4; --tiny: 1,2)")
    p.add_argument("--sweep-size", type=lambda s: counts(s)[0], default=None,
                   help="model of (b) and (c) (default 10M; --tiny: 100K)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"global batch (default {BATCH})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed steps per run (default {STEPS}; --tiny: 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed steps first (default {WARMUP}; --tiny: 1)")


def resolve(args, p) -> None:
    args.sizes = args.sizes or (TINY_SIZES if args.tiny else SIZES)
    args.servers = args.servers or ([1, 2] if args.tiny else SERVERS)
    args.workers = args.workers or ([1, 2] if args.tiny else WORKERS)
    args.sweep_size = args.sweep_size or (TINY_SWEEP_SIZE if args.tiny else SWEEP_SIZE)
    args.steps = args.steps or (1 if args.tiny else STEPS)
    args.warmup = args.warmup or (1 if args.tiny else WARMUP)
