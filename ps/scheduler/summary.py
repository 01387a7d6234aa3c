"""``summary.json``: the record of a run, from its fields to the launcher's one-line report.

The scheduler ``build``s the summary when it exits (its settings, the run accounting of
``ps.scheduler.runstate``, the shards' counters from their last heartbeats, deaths, rejoins,
checkpoints and each role's message faults) and ``write``s it; the launcher then
``amend``s it with the faults it injected and the recoveries it made, reads it back
(``lost_server``, ``report``) and prints the result. The invariant: the file is replaced
atomically, so a reader sees either no summary or a whole one, never a half-written file.
"""
from __future__ import annotations

import json
import os
import sys

from ps.core.dealer import Dealer
from ps.faults import messages
from ps.reliability.server_recovery import Recovery
from ps.scheduler import diagnose
from ps.scheduler.config import SchedulerConfig
from ps.scheduler.runstate import RunState
from ps.wire.protocol import is_int

FILE = "summary.json"


def max_staleness(shard_stats: dict[int, dict]) -> int:
    """The largest staleness any shard served (also in the scheduler's STATUS replies)."""
    return max((s.get("max_staleness", 0) for s in shard_stats.values()), default=0)


def status(phase: str, shard_stats: dict[int, dict], run: RunState | None,
           dealer: Dealer | None, step=None) -> dict:
    """The scheduler's STATUS reply: phase and progress; asked about a ``step``, also who
    holds its unreported tasks (``ps.scheduler.diagnose``)."""
    reply = {"phase": phase, "max_staleness": max_staleness(shard_stats)}
    if run:
        reply.update(run.progress())
        if is_int(step) and 0 <= step < run.steps:
            reply["missing"] = diagnose.holders(dealer, run, step)
    return reply


def net_faults(own: dict | None, shard_stats: dict[int, dict],
               workers: dict[tuple, dict]) -> dict[str, dict]:
    """Message faults (``ps.faults.messages``) by role: the scheduler's ``own``, each
    server's from its stats, each worker's summed over its incarnations (``workers``:
    (worker, inc) -> counts). Empty where no role had faults installed."""
    roles = {"scheduler": own} if own else {}
    for k, stats in sorted(shard_stats.items()):
        if "net_faults" in stats:
            roles[f"server{k}"] = stats["net_faults"]
    for (worker, _), counts in sorted(workers.items()):
        total = roles.setdefault(f"worker{worker}", dict.fromkeys(messages.COUNTERS, 0))
        for name in messages.COUNTERS:
            total[name] += counts[name]
    return roles


def unformed(cfg: SchedulerConfig, failure: str | None, job_error: dict | None) -> dict:
    """The summary of a run that failed before the cluster formed: the settings and why."""
    return {"mode": cfg.mode, "staleness": cfg.staleness, "servers": cfg.servers,
            "workers": cfg.workers, "seed": cfg.seed, "ok": False, "failure": failure,
            "job_error": job_error}


def build(cfg: SchedulerConfig, run: RunState, dealer: Dealer, shard_stats: dict[int, dict], *,
          failure: str | None, deaths: list[dict], rejoins: list[dict], recovery: Recovery,
          restarts: list[dict] = (), net_faults: dict | None = None,
          job_error: dict | None = None) -> dict:
    """The scheduler's summary of the run (the launcher adds faults and recoveries)."""
    return {**fields(cfg, run, dealer, shard_stats, failure, deaths, rejoins, recovery,
                     restarts, net_faults, job_error), **rounds(cfg, dealer, run)}


def rounds(cfg: SchedulerConfig, dealer: Dealer, run: RunState) -> dict:
    """DiLoCo: a run's steps are inner steps, taken in ``rounds`` of ``inner_steps`` (the
    run accounting counts rounds: each one a BSP version of the shards). Async: every
    worker's rounds, each of as many inner steps as its speed allowed (``per_worker``:
    ``tasks`` / ``pushes`` is a worker's mean), and the outer momentum's delay."""
    if cfg.mode != "diloco":
        return {}
    if cfg.diloco_async:
        return {"steps": dealer.total_steps, "rounds": sum(w.pushes for w in run.workers),
                "inner_steps": cfg.inner_steps, "async": True,
                "momentum_every": cfg.momentum_every or cfg.workers,
                "epochs": dealer.total_steps / dealer.plan.steps_per_epoch}
    return {"steps": dealer.total_steps, "rounds": dealer.rounds, "inner_steps": cfg.inner_steps,
            "epochs": dealer.total_steps / dealer.plan.steps_per_epoch}


def sparse_tables(shard_stats: dict) -> dict:
    """The job's sparse tables: rows materialised and bytes held, summed over the servers
    (each server's part of its stats; only ints are added), and per server."""
    tables: dict[str, dict] = {}
    for index, stats in sorted(shard_stats.items()):
        held = stats.get("sparse")
        if not isinstance(held, dict):
            continue
        for name, t in held.items():
            if not isinstance(t, dict):
                continue
            total = tables.setdefault(str(name), {"rows": 0, "evicted": 0, "per_server": []})
            total["rows"] += t["rows"] if is_int(t.get("rows")) else 0
            total["evicted"] += t["evicted"] if is_int(t.get("evicted")) else 0
            total["per_server"].append({"server": index, **{k: v for k, v in t.items()
                                                            if is_int(v)}})
    return {"sparse": tables} if tables else {}


def fields(cfg, run, dealer, shard_stats, failure, deaths, rejoins, recovery, restarts,
           net_faults, job_error) -> dict:
    return {"mode": cfg.mode, "staleness": cfg.staleness, "servers": cfg.servers,
            "workers": cfg.workers, "seed": cfg.seed, "ok": failure is None,
            "failure": failure, "job_error": job_error, "steal": cfg.steal,
            "tasks_per_step": dealer.plan.tasks_per_step,
            "task_grain": {"adaptive": dealer.adaptive, "fine_rounds": dealer.fine_rounds,
                           "coarse_rounds": dealer.coarse_rounds},
            **run.summary(dealer.stolen_by, dealer.stolen_from),
            "max_staleness": max_staleness(shard_stats),
            **sparse_tables(shard_stats),
            "duplicates_rejected": sum(s.get("duplicates_rejected", 0) for s in shard_stats.values()),
            "fenced_rejected": sum(s.get("fenced_rejected", 0) for s in shard_stats.values()),
            "clipped_steps": max((s.get("clipped_steps", 0) for s in shard_stats.values()),
                                 default=0),      # BSP steps whose clipping bit (this process's)
            "deaths": deaths, "rejoins": rejoins, "scheduler_restarts": list(restarts),
            "checkpoint_committed": recovery.committed, "resumed_from": recovery.resumed_from,
            "net_faults": net_faults or {},
            "shards": [shard_stats.get(k, {}) for k in range(cfg.servers)]}


def write(out: str, summary: dict) -> None:
    """Write ``out/summary.json`` through a temporary file and a rename."""
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(out, FILE))


def amend(out: str, faults, recoveries: list[dict]) -> None:
    """Add what was injected, and each recovery, to summary.json."""
    path = os.path.join(out, FILE)
    if not (faults or recoveries) or not os.path.exists(path):
        return
    with open(path) as f:
        summary = json.load(f)
    summary["faults_injected"] = [{"spec": f.spec, "fired_at_s": f.fired_at_s} for f in faults]
    restarts = iter(summary.get("scheduler_restarts", []))
    for record, fault in zip(summary["faults_injected"], faults):
        detected = getattr(fault, "detected_wall", None)      # a killed scheduler, restarted
        restart = next(restarts, None) if detected is not None else None
        if restart is not None:
            record["detected_at_s"] = fault.detected_at_s
            record["recovery_s"] = round(restart["reformed_wall"] - detected, 3)
    summary["recoveries"] = recoveries
    write(out, summary)


def read(out: str) -> dict:
    """summary.json as written, or {} when there is none (or it cannot be read)."""
    try:
        with open(os.path.join(out, FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def lost_server(out: str) -> str | None:
    """Did the scheduler end the run because a server went silent? (summary.json says)"""
    failure = read(out).get("failure") or ""
    if not failure.startswith("server "):
        return None
    return failure.split(" silent")[0].replace(" ", "")      # "server 1" -> "server1"


def dead_workers(out: str) -> set[str]:
    """The workers (role names) whose latest incarnation the run declared dead and did not
    replace: incarnations only grow, so a worker's last event, death or rejoin, decides."""
    s, last = read(out), {}
    for event, alive in [(d, False) for d in s.get("deaths", [])] + \
                        [(j, True) for j in s.get("rejoins", [])]:
        w = event["worker"]
        if w not in last or event["incarnation"] > last[w][0]:
            last[w] = (event["incarnation"], alive)
    return {f"worker{w}" for w, (_, alive) in last.items() if not alive}


def report(out: str) -> int:
    """Print the run's one-line result; 0 if it succeeded."""
    path = os.path.join(out, FILE)
    if not os.path.exists(path):
        print(f"no summary was written to {path}", file=sys.stderr)
        return 1
    with open(path) as f:
        s = json.load(f)
    if not s.get("ok"):
        print(f"run failed: {s.get('failure')}", file=sys.stderr)
        return 1
    loss = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "-"
    print(f"{s['mode']}: {s['steps']} steps, {s['samples']} samples in {s['wall_s']:.1f} s "
          f"({s['samples_per_s']:,.0f} samples/s), final loss {loss}, max staleness "
          f"{s['max_staleness']}, duplicates rejected {s['duplicates_rejected']}; results in {out}",
          file=sys.stderr)
    return 0
