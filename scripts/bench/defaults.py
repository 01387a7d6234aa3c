"""Suite ``defaults``: the two headline ratios, with every flag at its default.

What a new user sees who runs the cluster without tuning anything:

ddp    2 workers x 2 servers, BSP, on the ~10M-parameter MLP (scripts/jobs/mlp10m.py)
       with SGD (momentum 0.9) and a global batch of 128, against torch
       DistributedDataParallel (gloo) with 2 processes on the same job; 1 torch thread
       per process. Target: ours / DDP >= 1.0.
steal  2 workers, worker 1 slowed 3x (``--slow 1=3``), the compute-bound job of the
       stragglers suite: work stealing (the default) against static dealing
       (``--no-steal``). Target: steal / static >= 1.5.

Both systems of a pair run one after the other (A B A B ...) and each cell is the median
of --repeats runs, so the ratio compares runs made under the same conditions; the
absolute numbers depend on what else the machine is doing. Our runs add only what the
measurement needs: ``--threads 1`` (as the DDP processes have) and ``--trace``, whose
step end times give the timed window (it costs our side, not DDP's).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile

from .common import count, launch_run, markdown, step_end_times, timed_step_s
from .scale import sized_job
from .stragglers import straggler_run
from .train import baseline

MLP_PARAMS = 10_000_000
SGD = {"name": "sgd", "lr": 0.01, "momentum": 0.9}
BATCH = 128               # global batch: 64 samples per worker
STEPS = 120               # timed steps of a DDP-pair run (about 20 s per system here)
WARMUP = 3                # untimed steps first: connections, page faults, the allocator
STRAGGLER_STEPS = 20      # BSP steps of a stealing-pair run
REPEATS = 3
TARGETS = {"ddp": 1.0, "steal": 1.5}
PAIRS = {"ddp": ("ours", "ddp"), "steal": ("steal", "static")}   # pair -> (ours, baseline)


def sgd_job(folder: str, params: int) -> str:
    """mlp10m.py at ``params`` parameters, SGD with momentum, global batch BATCH."""
    path = sized_job(folder, params, batch=BATCH)
    with open(path, "a") as f:
        f.write(f"OPTIMIZER = {SGD!r}\n")
    return path


def ours(job: str, steps: int, warmup: int, out: str, device: str) -> dict:
    argv = ["--job", job, "--workers", "2", "--servers", "2", "--steps", str(warmup + steps),
            "--threads", "1", "--trace", "--device", device]
    summary = launch_run(argv, out, "ours (defaults)", lenient=True)
    step_s = timed_step_s(step_end_times(os.path.join(out, "trace.json")), warmup)
    return {"samples_per_s": BATCH / step_s, "step_s": step_s,
            "task_grain": summary.get("task_grain"), "final_loss": summary["final_loss"]}


def run(args) -> tuple[list[dict], str]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ps-bench-defaults-") as tmp:
        job = sgd_job(tmp, args.params)
        pairs = {pair: {s: [] for s in PAIRS[pair]} for pair in PAIRS if pair in args.pairs}
        for rep in range(args.repeats):
            for system in pairs.get("ddp", ()):
                out = os.path.join(tmp, f"{system}-{rep}")
                r = (ours(job, args.steps, args.warmup, out, args.device) if system == "ours"
                     else baseline("ddp", job, args.steps, args.warmup, 1, out, args.device))
                pairs["ddp"][system].append(r)
                print(f"  [{rep + 1}/{args.repeats}] {system}: {r['samples_per_s']:,.0f} samples/s",
                      file=sys.stderr, flush=True)
            for system in pairs.get("steal", ()):
                r = straggler_run(os.path.join(tmp, f"{system}-{rep}"), workers=2,
                                  steal=system == "steal", steps=args.straggler_steps, slow=True)
                pairs["steal"][system].append(r)
                print(f"  [{rep + 1}/{args.repeats}] slow worker, {system}: "
                      f"{r['samples_per_s']:,.0f} samples/s", file=sys.stderr, flush=True)
    for pair, runs in pairs.items():
        (a, ra), (b, rb) = runs.items()
        med_a = statistics.median(r["samples_per_s"] for r in ra)
        med_b = statistics.median(r["samples_per_s"] for r in rb)
        rows.append({"pair": pair, "a": a, "b": b, "a_samples_per_s": med_a,
                     "b_samples_per_s": med_b, "ratio": med_a / med_b,
                     "target": TARGETS[pair], "meets_target": med_a / med_b >= TARGETS[pair],
                     "repeats": args.repeats, "device": args.device if pair == "ddp" else "cpu",
                     "a_runs": ra, "b_runs": rb})
    return rows, table(rows, args)


def table(rows: list[dict], args) -> str:
    what = {"ddp": f"{count(args.params)} MLP, SGD momentum, batch {BATCH}, 2 workers x 2 "
                   f"servers vs DDP (2 processes), on {args.device}",
            "steal": "compute-bound job, 2 workers, worker 1 slowed 3x: stealing vs static"}
    lines = [[what[r["pair"]], f"{r['a_samples_per_s']:,.0f}", f"{r['b_samples_per_s']:,.0f}",
              f"**{r['ratio']:.2f}x**", f">= {r['target']:.1f}x",
              "yes" if r["meets_target"] else "no"] for r in rows]
    return (markdown(["default flags", "ours samples/s", "baseline samples/s", "ratio", "target",
                      "met"], lines)
            + f"\n\nMedians of {args.repeats} run(s) each, systems alternating; 1 torch thread "
              f"per process; DDP pair: {args.warmup} warm-up then {args.steps} timed steps.")


def add_arguments(p) -> None:
    p.add_argument("--repeats", type=int, default=None, help=f"runs per system (default {REPEATS})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed steps of a DDP-pair run (default {STEPS})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed steps first (default {WARMUP})")
    p.add_argument("--straggler-steps", type=int, default=None,
                   help=f"steps of a stealing-pair run (default {STRAGGLER_STEPS})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the DDP pair trains: our workers and the DDP processes (default cpu)")
    p.add_argument("--pairs", type=lambda t: t.split(","), default=["ddp", "steal"],
                   help="which pairs to run: ddp, steal (default both)")
    p.add_argument("--params", type=int, default=None,
                   help=f"MLP parameters of the DDP pair (default {MLP_PARAMS:,})")


def resolve(args, p) -> None:
    args.repeats = args.repeats or (1 if args.tiny else REPEATS)
    args.steps = args.steps or (2 if args.tiny else STEPS)
    args.warmup = args.warmup or (1 if args.tiny else WARMUP)
    args.straggler_steps = args.straggler_steps or (3 if args.tiny else STRAGGLER_STEPS)
    args.params = args.params or (100_000 if args.tiny else MLP_PARAMS)
    unknown = [pair for pair in args.pairs if pair not in PAIRS]
    if unknown:
        p.error(f"--pairs: unknown {unknown}; choose from {list(PAIRS)}")
