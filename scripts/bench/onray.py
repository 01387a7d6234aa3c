"""Suite ``ray``: what the Ray engine costs against the local launcher, and how long a run
takes to resume after Ray loses a node.

Ray binds the machine's first address, so everything here runs in loopback-only network
namespaces (``scripts/ray_sim.py``), the local launcher too, for the same conditions:

1. the MLP example, 2 workers x 2 servers in BSP, with the local launcher and with
   ``--ray local`` (a throwaway Ray the launcher starts and stops), alternating;
2. the simulated cluster up (a head, 2 server nodes and 3 worker nodes on this machine,
   its raylets idling beside the run), the local launcher and ``--ray ADDRESS`` on it,
   servers and workers on their own nodes, alternating;
3. on the simulated cluster, the same run with ``--respawn --trace``, and the node
   holding worker1 removed at step ``--remove-at``: the death's detection (the
   scheduler's record), the end of the step that stalled (the workers' traces), and
   whether every sample was applied once.

``start+stop s`` is the launcher's whole wall time less the training's (summary.json's
``wall_s``, the scheduler's clock from the first step); samples/s is the summary's.
Medians over ``--repeats``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from .common import ROOT, group, markdown, run_group, step_end_times

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import ray_sim  # noqa: E402

MLP_JOB = os.path.join(ROOT, "examples", "mlp_classifier.py")
REPEATS = 3
RUN_TIMEOUT_S = 300.0


def launcher(ns: str, out: str, steps: int, *extra: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "ps.launch", "--job", MLP_JOB,
            "--workers", "2", "--servers", "2", "--steps", str(steps), "--device", "cpu",
            "--quiet", "--out", out, *extra]


def timed_run(cmd: list[str], out: str, what: str) -> dict:
    """Run one launcher to the end; its summary, with ``launcher_s`` (whole wall time)."""
    t0 = time.monotonic()
    rc, _, stderr = run_group(cmd, what, RUN_TIMEOUT_S)
    if rc != 0:
        raise RuntimeError(f"{what} run failed ({rc}):\n{stderr[-2000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    summary["launcher_s"] = time.monotonic() - t0
    return summary


def row(engine: str, where: str, runs: list[dict], base: dict | None) -> dict:
    speeds = [r["samples_per_s"] for r in runs]
    median = runs[speeds.index(statistics.median_low(speeds))]
    overhead = statistics.median(r["launcher_s"] - r["wall_s"] for r in runs)
    r = {"engine": engine, "where": where, "runs": len(runs), "steps": median["steps"],
         "launcher_s": round(statistics.median(x["launcher_s"] for x in runs), 2),
         "start_stop_s": round(overhead, 2), "train_s": round(median["wall_s"], 2),
         "samples_per_s": round(median["samples_per_s"]), "samples_per_s_runs": speeds}
    if base:
        r["start_stop_x"] = round(overhead / base["start_stop_s"], 2)
        r["samples_per_s_ratio"] = round(r["samples_per_s"] / base["samples_per_s"], 3)
    return r


def overhead_phase(args, tmp: str) -> list[dict]:
    """Local vs --ray local, then local vs --ray ADDRESS on the simulated cluster."""
    rows = []
    ns = ray_sim.loopback_namespace(f"psbench-{os.getpid()}")
    try:
        runs = {"local": [], "ray": []}
        for rep in range(args.repeats):
            for engine, extra in (("local", []), ("ray", ["--ray", "local"])):
                out = os.path.join(tmp, f"a-{engine}{rep}")
                runs[engine].append(timed_run(launcher(ns, out, args.steps, *extra), out, engine))
            print(f"  local vs --ray local: {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
    finally:
        ray_sim.delete_namespace(ns)
    base = row("local", "this machine", runs["local"], None)
    rows += [base, row("ray local", "a throwaway Ray on this machine", runs["ray"], base)]
    return rows


def cluster_phase(args, tmp: str) -> tuple[list[dict], dict]:
    sim = ray_sim.Simulated()
    try:
        print(f"  simulated cluster up: {', '.join(sim.nodes)}", file=sys.stderr, flush=True)
        runs = {"local": [], "ray": []}
        for rep in range(args.repeats):
            for engine, extra in (("local", []), ("ray", ["--ray", sim.address, *ray_sim.ON_NODES])):
                out = os.path.join(tmp, f"b-{engine}{rep}")
                runs[engine].append(timed_run(launcher(sim.ns, out, args.steps, *extra), out, engine))
            print(f"  local vs --ray ADDRESS: {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
        base = row("local", "beside the idle simulated cluster", runs["local"], None)
        rows = [base, row("ray cluster", "6-node simulated cluster, roles on 5 nodes",
                          runs["ray"], base)]
        removal = removal_run(args, sim, os.path.join(tmp, "removal"), runs["ray"][-1])
    finally:
        sim.close()
    return rows, removal


def removal_run(args, sim, out: str, undisturbed: dict) -> dict:
    """Remove worker1's node at step --remove-at; when was it detected, when did the
    stalled step end, and was every sample applied once (the scheduler's tally of each
    epoch, against the undisturbed run's on the same cluster)? (That the parameters are the
    oracle's is the tests' business, on runs short enough for 1e-5 to hold: over hundreds
    of steps this example amplifies the rounding of a different summation order.)"""
    cmd = launcher(sim.ns, out, args.steps, "--ray", sim.address, *ray_sim.ON_NODES,
                   "--respawn", "--trace")
    with group(cmd) as proc:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the removal run ended or hung before step {args.remove_at}:\n"
                                   f"{proc.communicate()[1][-2000:]}")
            try:
                with open(os.path.join(out, "cluster.json")) as f:
                    roles = json.load(f)["roles"]
                if sim.status(roles["scheduler"]["endpoint"]).get("step", 0) >= args.remove_at:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        node = sim.names[roles["worker1"]["node"]]
        removed_at = sim.remove(node)
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"the removal run failed ({proc.returncode}):\n{stderr[-2000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    ends = sorted(step_end_times(os.path.join(out, "trace.json"), absolute=True).values())
    before = [b - a for a, b in zip(ends, ends[1:]) if b < removed_at]
    after = [(b - a, b) for a, b in zip(ends, ends[1:]) if b > removed_at]
    pause, resumed = max(after)                         # the stall, and the step that ended it
    tally = [e["samples_applied"] for e in summary["per_epoch"]]
    once = tally == [e["samples_applied"] for e in undisturbed["per_epoch"]]
    death = summary["deaths"][0]
    return {"node": node, "removed_at_step": args.remove_at,
            "detected_s": round(death["detected_wall"] - removed_at, 3),
            "resumed_s": round(resumed - removed_at, 3), "longest_pause_s": round(pause, 3),
            "median_step_s": round(statistics.median(before), 4),
            "tasks_redealt": death["tasks_redealt"], "rejoins": len(summary["rejoins"]),
            "every_sample_once": once, "samples_applied_per_epoch": tally, "samples_per_s": round(summary["samples_per_s"])}


def run(args) -> tuple[list[dict], str]:
    with tempfile.TemporaryDirectory(prefix="ps-bench-ray-") as tmp:
        try:
            rows = overhead_phase(args, tmp)
            more, removal = cluster_phase(args, tmp)
        except ray_sim.Unavailable as exc:
            raise SystemExit(f"suite ray: {exc}") from None
    rows += more
    table = markdown(
        ["engine", "where", "launcher s", "start+stop s", "x local", "train s", "samples/s",
         "x local"],
        [[r["engine"], r["where"], f"{r['launcher_s']:.1f}", f"{r['start_stop_s']:.1f}",
          r.get("start_stop_x", "-"), f"{r['train_s']:.2f}", f"{r['samples_per_s']:,}",
          r.get("samples_per_s_ratio", "-")] for r in rows])
    node = markdown(
        ["node removed", "at step", "detected s", "stalled step ended s", "longest pause s",
         "median step s", "tasks dealt again", "replacements", "every sample once"],
        [[removal["node"], removal["removed_at_step"], f"{removal['detected_s']:.2f}",
          f"{removal['resumed_s']:.2f}", f"{removal['longest_pause_s']:.2f}",
          f"{removal['median_step_s']:.4f}", removal["tasks_redealt"], removal["rejoins"],
          "yes" if removal["every_sample_once"] else "NO"]])
    note = (f"MLP example ({args.steps} steps), 2 workers x 2 servers, BSP; median of "
            f"{args.repeats} runs, engines alternating. Times from the removal: the "
            "scheduler's death record, and the trace's step ends (workers' clocks).")
    return rows + [{"removal": removal}], table + "\n\n" + node + "\n\n" + note


def add_arguments(p) -> None:
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 640; --tiny 30)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"runs per engine (default {REPEATS}; --tiny 1)")
    p.add_argument("--remove-at", type=int, default=None,
                   help="the step at which worker1's node is removed (default: a third of the run)")


def resolve(args, p) -> None:
    args.steps = args.steps or (30 if args.tiny else 640)
    args.repeats = args.repeats or (1 if args.tiny else REPEATS)
    args.remove_at = args.remove_at or max(1, args.steps // 3)
    if args.remove_at >= args.steps:
        p.error("--remove-at must be below --steps")
