"""Suite ``clip``: what clipping's norm agreement adds to a BSP step.

With ``CLIP_GRAD_NORM`` a shard that has its whole step does not apply it at once: it sends
its part of the squared norm to the scheduler and waits for the total (NORM,
``ps.scheduler.norms``), one round trip per step between the step's last push and the
moment its parameters can be read. This suite runs the ~10M and ~50M-parameter MLP
(scripts/jobs/mlp10m.py resized; AdamW, global batch 128) on 2 and 4 servers with 2
workers, with and without ``CLIP_GRAD_NORM = 1.0``, the two alternating, and reports:

    step_ms       the median step time of each (from the trace's step end times)
    added_ms      clip minus plain
    held_ms       how long a shard held a complete step for its norm, mean over steps
                  and shards (the servers' ``norm_hold`` counters): the exchange itself

The step includes a pass over the shard for its part of the norm (``Shard._hold_for_norm``);
``held_ms`` counts it from the NORM's sending, so the pass is in ``added_ms`` only.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile

from .common import count, launch_run, markdown, step_end_times, timed_step_s
from .scale import sized_job

SIZES = (10_000_000, 50_000_000)
SERVERS = (2, 4)
ADAMW = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}
BATCH = 128
STEPS = {10_000_000: 20, 50_000_000: 8}     # timed steps per run
WARMUP = 2
REPEATS = 2


def job_file(folder: str, params: int, clip: bool) -> str:
    path = sized_job(folder, params, batch=BATCH)
    clipped = path.replace(".py", "_clip.py") if clip else path
    with open(path) as f:
        text = f.read()
    with open(clipped, "w") as f:
        f.write(text + f"OPTIMIZER = {ADAMW!r}\n" + ("CLIP_GRAD_NORM = 1.0\n" if clip else ""))
    return clipped


def one_run(job: str, servers: int, steps: int, warmup: int, out: str) -> dict:
    argv = ["--job", job, "--workers", "2", "--servers", str(servers),
            "--steps", str(warmup + steps), "--threads", "1", "--trace", "--device", "cpu"]
    summary = launch_run(argv, out, os.path.basename(out), lenient=True)
    holds = [s["norm_hold"] for s in summary["shards"] if s.get("norm_hold")]
    held = [h["held_s"] / h["steps"] for h in holds if h["steps"]]
    return {"step_s": timed_step_s(step_end_times(os.path.join(out, "trace.json")), warmup),
            "held_s": statistics.mean(held) if held else None,
            "clipped_steps": summary.get("clipped_steps", 0)}


def run(args) -> tuple[list[dict], str]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ps-bench-clip-") as tmp:
        for params in args.sizes:
            jobs = {clip: job_file(tmp, params, clip) for clip in (False, True)}
            steps = args.steps or STEPS.get(params, 10)
            for servers in SERVERS:
                runs = {False: [], True: []}
                for rep in range(args.repeats):
                    for clip in (False, True):
                        out = os.path.join(tmp, f"{count(params)}-{servers}-{clip}-{rep}")
                        r = one_run(jobs[clip], servers, steps, args.warmup, out)
                        runs[clip].append(r)
                        print(f"  [{rep + 1}/{args.repeats}] {count(params)}, {servers} servers, "
                              f"{'clip' if clip else 'plain'}: {r['step_s'] * 1e3:.1f} ms/step",
                              file=sys.stderr, flush=True)
                plain = statistics.median(r["step_s"] for r in runs[False])
                clip = statistics.median(r["step_s"] for r in runs[True])
                held = statistics.median(r["held_s"] for r in runs[True])
                rows.append({"params": params, "servers": servers, "workers": 2,
                             "plain_step_s": plain, "clip_step_s": clip,
                             "added_s": clip - plain, "held_s": held,
                             "clipped_steps": [r["clipped_steps"] for r in runs[True]],
                             "repeats": args.repeats, "steps": steps,
                             "plain_runs": runs[False], "clip_runs": runs[True]})
    return rows, table(rows, args)


def table(rows: list[dict], args) -> str:
    lines = [[count(r["params"]), str(r["servers"]), f"{r['plain_step_s'] * 1e3:.1f}",
              f"{r['clip_step_s'] * 1e3:.1f}", f"{r['added_s'] * 1e3:+.1f}",
              f"{r['held_s'] * 1e3:.2f}"] for r in rows]
    return (markdown(["MLP", "servers", "plain ms/step", "clip ms/step", "added ms",
                      "held for the norm, ms"], lines)
            + f"\n\n2 workers, AdamW, batch {BATCH}, 1 torch thread per process; medians of "
              f"{args.repeats} run(s) of each, alternating; {args.warmup} warm-up steps.")


def add_arguments(p) -> None:
    p.add_argument("--sizes", type=lambda t: [int(float(x)) for x in t.split(",")], default=None,
                   help="model sizes in parameters (default 1e7,5e7)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default by size)")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed steps first (default {WARMUP})")
    p.add_argument("--repeats", type=int, default=None, help=f"runs of each (default {REPEATS})")


def resolve(args, p) -> None:
    args.sizes = args.sizes or ([100_000] if args.tiny else list(SIZES))
    args.steps = args.steps or (2 if args.tiny else None)
    args.warmup = args.warmup or (1 if args.tiny else WARMUP)
    args.repeats = args.repeats or (1 if args.tiny else REPEATS)
