"""Suite ``stragglers``: work stealing against static dealing, with a slow worker and jitter.

Work stealing against static dealing (``--no-steal``) on a compute-bound job
(scripts/jobs/compute_bound.py: tasks of tens of ms on one thread), 1 server,
``--threads 1``. (a) BSP with worker 1 ``--slow 1=3``, 2 and 4 workers: samples/s with
and without stealing, and wall time against the ideal (total compute / sum of worker
speeds, speeds measured in (b)'s runs); (b) the same without a slow worker: what
stealing costs when nothing is slow; (c) ``--jitter 0.2:3`` (any task 3x slow,
p = 0.2) in BSP, SSP(2) and ASP: wall time until a step's loss first falls below a
target, from each run's ``--trace`` (the end of the last push of that step). Stealing
and static runs alternate (A B A B ...); each cell is the median of the repeats.

On a shared machine other jobs' CPU spoils timings, so each run first waits (up to
--settle-s) for a quiet second, measures the CPU that processes outside the benchmark
used meanwhile ("other load", in cores), and is run again (up to --redos times) if
that passed NOISY_CORES.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from .common import LAUNCHERS, ROOT, ints, kill_group, launch_run, markdown, step_end_times

STRAGGLER_JOB = os.path.join(ROOT, "scripts", "jobs", "compute_bound.py")
SLOW_FACTOR = 3.0         # --slow 1=3: worker 1 takes 3x as long per task
JITTER = "0.2:3"          # --jitter P:F of the time-to-target runs
THROUGHPUT_STEPS = 20     # BSP steps of a throughput run: ~3-10 s of training on 2 cores
TARGET_LOSS = 1.5         # a loss every mode reaches (ln(10) ~ 2.3 at the start); measured
                          # under jitter: BSP at step 14, SSP(2) ~24, ASP ~8
TARGET_STEPS = {"bsp": 20, "ssp": 32, "asp": 12}   # steps per mode of a time-to-target run:
                          # enough to pass TARGET_LOSS with margin, no more
REPEATS = 2               # runs per cell (it is the slowest suite)
QUIET_CORES = 0.2         # before a run, wait for other processes to use less than
SETTLE_S = 60.0           # this many cores, for at most this long (--settle-s)
NOISY_CORES = 0.25        # a run during which other processes used more is run again, at most
REDOS = 2                 # this many times (--redos); the cleanest attempt counts, all are kept


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


def run(args) -> tuple[list[dict], str]:
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


def add_arguments(g) -> None:
    g.add_argument("--workers", type=ints, default=None,
                   help="worker counts of the throughput runs (default 2,4; --tiny: 2)")
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
    g.add_argument("--repeats", type=int, default=None,
                   help=f"runs per cell (default {REPEATS}; --tiny: 1)")


def resolve(args, p) -> None:
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
    args.repeats = args.repeats or (1 if args.tiny else REPEATS)
    if any(w < 2 for w in args.workers):
        p.error("--workers: the slow worker is worker 1, so at least 2 workers")
