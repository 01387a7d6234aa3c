"""Suite ``modes``: samples/s of the MLP example in BSP, SSP(2) and ASP.

The MLP example, 2 workers x 2 servers, run with ``python -m ps.launch`` once per mode
and repeat (modes alternate within each repeat, so machine noise hits all alike);
numbers from each run's summary.json, the median run of each mode.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile

from .common import ROOT, launch_run, markdown

MLP_JOB = os.path.join(ROOT, "examples", "mlp_classifier.py")
REPEATS = 3               # runs per mode
MODE_FIELDS = ("staleness", "steps", "samples", "samples_per_s", "wall_s", "final_loss",
               "max_staleness")   # what the suite keeps of each run's summary.json


def mode_run(mode: str, steps: int | None, out: str) -> dict:
    """One ``ps.launch`` run of the MLP example; its summary.json."""
    argv = ["--job", MLP_JOB, "--mode", mode, "--workers", "2", "--servers", "2"]
    argv += ["--staleness", "2"] if mode == "ssp" else []
    argv += ["--steps", str(steps)] if steps else []
    return launch_run(argv, out, mode)


def run(args) -> tuple[list[dict], str]:
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


def add_arguments(p) -> None:
    p.add_argument("--steps", type=int, default=None,
                   help="global steps per run (default: the job's 20 epochs; --tiny: 3)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["bsp", "ssp", "asp"],
                   help="modes to run (default bsp,ssp,asp)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"runs per mode (default {REPEATS}; --tiny: 1)")


def resolve(args, p) -> None:
    args.steps = args.steps or (3 if args.tiny else None)
    args.repeats = args.repeats or (1 if args.tiny else REPEATS)
