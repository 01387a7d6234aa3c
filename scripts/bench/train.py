"""Suite ``train``: samples/s of one model, our cluster beside DDP and an RPC server.

For each model (the ~10M-parameter MLP of scripts/jobs/mlp10m.py and the example
language model, examples/char_transformer.py), in the same run and one after another:

ours  ``python -m ps.launch`` in BSP with 2 workers and 2 servers (--servers), --trace
      two variants beside it, the same launcher run with one thing changed:
      ours_fuse1  --fuse 1: one forward and backward pass per task, as before leases
                  were fused (4 passes of 32 samples per worker and step for the MLP,
                  where the default computes a worker's share in one pass when the deal
                  is balanced: README, "Fused leases")
      ours_1srv   --servers 1: the model in one shard (a small model's second shard only
                  adds a round trip to every pull and push)
      ours_bf16   --grad-dtype bfloat16 --param-dtype bfloat16: half the bytes on the
                  wire; servers keep float32 parameters and optimizer state, so the
                  numerics differ from float32 within bfloat16's rounding
ddp   torch DistributedDataParallel, gloo backend, 2 processes (bench/ddp_baseline.py)
rpc   a torch.distributed.rpc parameter server with 2 trainers, batch-synchronous
      (bench/rpc_baseline.py)
rpc_tutorial  the design of PyTorch's RPC parameter server tutorial with 2 trainers:
      forward and backward on the server through an RRef, each trainer stepping with
      its own DistributedOptimizer, one trainer's step at a time under a lock
      (bench/rpc_tutorial_baseline.py); each trainer step is an update on half the
      global batch, so its numerics differ, and samples/s counts both trainers' samples

Same job file, so the same model, initial values, data, global batch (the job's
BATCH_SIZE) and optimizer (the job's OPTIMIZER: Adam for the MLP, AdamW for the
language model); the same number of steps; every torch process the same thread count
(--threads, default cores / 2). Each system is timed the same way: ``--warmup`` steps
first, then ``--steps`` steps, from the end of step warmup - 1 to the end of the last
step (ours: from the run's trace, the end of each step's last push; rpc_tutorial: a
"step" is 2 updates, one per trainer, a global batch's worth of samples). Our cluster
also runs a scheduler and numpy servers beside its 2 workers; each RPC server is a third
torch process. Systems alternate within each repeat; each cell is the median.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile

from .common import ROOT, launch_run, markdown, run_group, step_end_times, timed_step_s
from .scale import sized_job

JOBS = {"mlp10m": os.path.join(ROOT, "scripts", "jobs", "mlp10m.py"),
        "char_transformer": os.path.join(ROOT, "examples", "char_transformer.py")}
BASELINES = os.path.join(ROOT, "scripts", "bench")
STEPS = {"mlp10m": 30, "char_transformer": 80}    # timed steps at full size: ~5-10 s per
                          # system on 2 cores (mlp10m ~0.2-0.4 s a step, the LM ~20-50 ms)
TINY_STEPS = 2
WARMUP = 3                # untimed steps first: connections, page faults, the allocator
REPEATS = 1               # runs per system and model (--repeats)
TINY_MLP_PARAMS = 100_000  # --tiny --models mlp10m: the MLP at this size (scale.sized_job)
WORKERS = 2               # our workers, DDP processes, RPC trainers
# Our variants: extra launcher flags, run in turn with the others (key -> flags, label).
VARIANTS = {"ours_fuse1": (["--fuse", "1"], "ours, one pass per task"),
            "ours_1srv": (["--servers", "1"], "ours, 1 server"),
            "ours_bf16": (["--grad-dtype", "bfloat16", "--param-dtype", "bfloat16"],
                          "ours, bfloat16 wire")}
BASES = ("ddp", "rpc", "rpc_tutorial")   # the torch baselines, each a bench/*_baseline.py
SYSTEMS = ("ours", *VARIANTS, *BASES)


def ours(job: str, steps: int, warmup: int, threads: int, servers: int,
         tasks_per_step: int | None, out: str, system: str = "ours") -> dict:
    """One launcher run in BSP with 2 workers, timed from its trace; ``system``: "ours"
    or one of VARIANTS, whose flags come last (so they win over --tasks-per-step)."""
    argv = ["--job", job, "--mode", "bsp", "--workers", str(WORKERS), "--servers", str(servers),
            "--steps", str(warmup + steps), "--threads", str(threads), "--trace"]
    argv += ["--tasks-per-step", str(tasks_per_step)] if tasks_per_step else []
    extra = VARIANTS[system][0] if system != "ours" else []
    summary = launch_run(argv + extra, out, f"{system} on {os.path.basename(job)}",
                         lenient=True)
    step_s = timed_step_s(step_end_times(os.path.join(out, "trace.json")), warmup)
    batch = summary["samples"] // summary["steps"]
    wire = dict(zip(extra[::2], extra[1::2]))
    return {"system": system, "step_s": step_s, "samples_per_s": batch / step_s,
            "batch": batch, "servers": int(wire.get("--servers", servers)),
            "tasks_per_step": summary["tasks_per_step"],
            "fuse": int(wire.get("--fuse", 0)), "grad_dtype": wire.get("--grad-dtype", "float32"),
            "param_dtype": wire.get("--param-dtype", "float32"),
            "final_loss": summary["final_loss"], "wall_s": summary["wall_s"]}


def baseline(system: str, job: str, steps: int, warmup: int, threads: int, out: str,
             device: str = "cpu") -> dict:
    """One run of bench/{system}_baseline.py (a system of BASES); its JSON result. Only
    the DDP baseline takes a ``device`` other than the CPU."""
    script = os.path.join(BASELINES, f"{system}_baseline.py")
    result = os.path.join(out, f"{system}.json")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, script, "--job", job, "--steps", str(steps), "--warmup", str(warmup),
           "--threads", str(threads), "--out", result]
    cmd += ["--device", device] if device != "cpu" else []
    rc, _, stderr = run_group(cmd, f"{system} on {os.path.basename(job)}")
    if rc != 0 or not os.path.exists(result):
        raise RuntimeError(f"{system} baseline failed ({rc}):\n{stderr[-2000:]}")
    with open(result) as f:
        return json.load(f)


def run(args) -> tuple[list[dict], str]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ps-bench-train-") as tmp:
        for model in args.models:
            job = JOBS[model]
            if model == "mlp10m" and args.tiny:
                job = sized_job(tmp, TINY_MLP_PARAMS)
            steps = args.steps or STEPS[model]
            runs = {s: [] for s in SYSTEMS}
            for rep in range(args.repeats):            # systems alternate within a repeat
                for system in SYSTEMS:
                    out = os.path.join(tmp, f"{model}-{system}-{rep}")
                    if system.startswith("ours"):
                        r = ours(job, steps, args.warmup, args.threads, args.servers,
                                 args.tasks_per_step, out, system)
                    else:
                        r = baseline(system, job, steps, args.warmup, args.threads, out)
                    runs[system].append(r)
                    print(f"  {model} {system}: {r['samples_per_s']:,.0f} samples/s",
                          file=sys.stderr, flush=True)
            row = {"model": model, "steps": steps, "warmup": args.warmup,
                   "threads": args.threads, "repeats": args.repeats,
                   "batch": runs["ours"][0]["batch"], "params": runs["ddp"][0]["params"],
                   "optimizer": runs["ddp"][0]["optimizer"], "servers": args.servers,
                   "tasks_per_step": runs["ours"][0]["tasks_per_step"]}
            for system, results in runs.items():
                row[f"{system}_samples_per_s"] = statistics.median(
                    r["samples_per_s"] for r in results)
                row[f"{system}_step_s"] = statistics.median(r["step_s"] for r in results)
                row[f"{system}_runs"] = results
            for system in ("ours", *VARIANTS):
                first = runs[system][0]
                if system != "ours":
                    row[f"{system}_tasks_per_step"] = first["tasks_per_step"]
                    row[f"{system}_grad_dtype"] = first["grad_dtype"]
                    row[f"{system}_param_dtype"] = first["param_dtype"]
                for base in BASES:
                    row[f"{system}_over_{base}"] = (row[f"{system}_samples_per_s"]
                                                    / row[f"{base}_samples_per_s"])
            rows.append(row)
    return rows, table(rows) + "\n\n" + note(args, rows)


def table(rows: list[dict]) -> str:
    """One line per model, as before, then one line per variant of ours under it; a
    variant's line is compared with the same DDP and RPC runs as the model's line."""
    def cell(r, s):
        return f"{r[f'{s}_samples_per_s']:,.0f} ({r[f'{s}_step_s'] * 1e3:.1f})"

    def ratios(r, s):
        return [f"{r[f'{s}_over_{b}']:.2f}" for b in BASES]
    lines = []
    for r in rows:
        same = [f"{r['params']:,}", r["batch"], r["optimizer"]]
        lines.append([r["model"], *same, r["tasks_per_step"],
                      *(cell(r, s) for s in ("ours", *BASES)), *ratios(r, "ours")])
        for v, (_, label) in VARIANTS.items():
            lines.append([f"{r['model']}: {label}", *same, r[f"{v}_tasks_per_step"],
                          cell(r, v), *["(as above)"] * len(BASES), *ratios(r, v)])
    return markdown(
        ["model", "params", "batch", "optimizer", "ours: tasks / step",
         "ours samples/s (step ms)", "DDP samples/s (step ms)", "RPC PS samples/s (step ms)",
         "RPC tutorial samples/s (step ms)", "ours / DDP", "ours / RPC PS",
         "ours / RPC tutorial"], lines)


def note(args, rows: list[dict]) -> str:
    return (f"{WORKERS} workers / DDP processes / RPC trainers, {args.threads} torch thread(s) "
            f"each; ours: BSP, {args.servers} servers. Timed: {args.warmup} warm-up steps, "
            f"then {', '.join(str(r['steps']) for r in rows)} steps; median of {args.repeats} "
            f"run(s) per cell, systems alternating ({', '.join(SYSTEMS)}). Variant lines: "
            "\"one pass per task\" is --fuse 1 (each of a worker's tasks in a forward and "
            "backward pass of its own, instead of the tasks it leases together); "
            "\"1 server\" is --servers 1; "
            "\"bfloat16 wire\" is --grad-dtype bfloat16 --param-dtype "
            "bfloat16: gradients and parameters travel as bfloat16, servers keep float32 "
            "parameters and optimizer state. That changes the numerics (within bfloat16's "
            "rounding of each pushed gradient and pulled parameter), so that line is not "
            "like-for-like with float32 DDP and RPC. \"RPC tutorial\" is the design of "
            "PyTorch's RPC parameter-server tutorial (forward and backward in the server "
            "process, a DistributedOptimizer per trainer), one trainer's step at a time "
            "under a lock: every trainer step is an update on 1/"
            f"{WORKERS} of the global batch, so its step is {WORKERS} updates and it "
            "trains different numerics from a global-batch update; its samples/s counts "
            "every trainer's samples.")


def add_arguments(p) -> None:
    p.add_argument("--models", type=lambda s: s.split(","), default=None,
                   help=f"models (default {','.join(JOBS)}; --tiny: char_transformer, the "
                        "MLP is the scale suite's)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed steps per run (default {STEPS}; --tiny: {TINY_STEPS})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed steps first (default {WARMUP}; --tiny: 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of every process (default: cores / 2, at least 1)")
    p.add_argument("--servers", type=int, default=2, help="our servers (default 2)")
    p.add_argument("--tasks-per-step", type=int, default=None,
                   help="our tasks per step (default: the launcher's, 4 per worker)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"runs per system and model (default {REPEATS}; --tiny: 1)")


def resolve(args, p) -> None:
    args.models = args.models or (["char_transformer"] if args.tiny else list(JOBS))
    unknown = [m for m in args.models if m not in JOBS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(JOBS)}")
    args.steps = args.steps or (TINY_STEPS if args.tiny else None)
    args.warmup = args.warmup or (1 if args.tiny else WARMUP)
    args.threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    args.repeats = args.repeats or (1 if args.tiny else REPEATS)
