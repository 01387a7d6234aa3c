"""Forming: the cluster's first phase, from the first REGISTER to every member's configuration.

While the cluster forms, each REGISTER is checked (``ps.scheduler.registration``) and its reply is
held (``Scheduler.held``). When all S servers and M workers have joined, ``form`` cuts
the model's flat parameters into S ranges (``ps.core.sharding``), plans the run's steps and
tasks (``ps.reliability.scheduler_restart.build``), resumes from a checkpoint if asked (``ps.reliability.server_recovery``),
journals the formation (on disk before any reply) and answers every held REGISTER: a
server with its range, the optimizer and the mode; a worker with the shard map and the
steps to run (``welcome``, which also answers a replacement joining mid-run).

The functions take the scheduler (``s``) whose state they change, as ``ps.reliability.scheduler_restart`` does;
``Scheduler.on_register`` calls ``register``.
"""
from __future__ import annotations

import logging
import time

from ps.core import sharding
from ps.reliability import scheduler_restart
from ps.scheduler import registration
from ps.wire.protocol import Error, Kind, ProtocolError
from ps.scheduler.config import crash_at, default_tasks_per_step
from ps.core.tasks import steps_per_epoch

log = logging.getLogger("ps.scheduler")


def register(s, ident, header) -> None:
    """A REGISTER: a member back after our restart, a replacement worker mid-run, or (while
    forming) a new member, held until everyone has joined."""
    if isinstance(header.get("inc"), int) and header["inc"] > 0:   # back after our restart
        return scheduler_restart.register_again(s, ident, header)
    if s.phase == "training" and header["role"] == "worker":       # a replacement (ps.reliability.worker_failover)
        index, inc, start = s.failover.replace(header, s.workers[0], s.dealer, s.run)
        return welcome(s, ident, header["rid"], index, inc, start_step=max(start, 0))
    if s.phase == "failed":
        raise ProtocolError(Error.RUN_OVER, f"the run failed: {s.failure}")
    if s.phase in ("finishing", "stopping") and header["role"] == "worker":
        raise ProtocolError(Error.RUN_OVER, f"training is over ({s.phase}): no worker is needed")
    if s.phase != "forming":
        raise ProtocolError(Error.BAD_FIELD, "the cluster has already formed")
    index = registration.admit(header, s.servers, s.workers, s.config)
    s.members.join(header["role"], index, time.monotonic())
    s.held.append((ident, header["rid"], header["role"], index))
    log.info("%s %d registered", header["role"], index)
    crash_at(s.config, "register", len(s.held))
    if len(s.servers) == s.config.servers and len(s.workers) == s.config.workers:
        form(s)


def form(s) -> None:
    """Everyone has joined: cut, plan, (resume,) journal, answer every held REGISTER."""
    cfg, job = s.config, s.workers[0]
    specs = sharding.layout([(name, shape) for name, shape in job["layout"]])
    ranges = sharding.cut(sharding.total_size(specs), cfg.servers)
    tasks_per_step = cfg.tasks_per_step or default_tasks_per_step(job["batch_size"], cfg.workers)
    steps = cfg.steps or (cfg.epochs or job["epochs"] or 1) * steps_per_epoch(
        job["dataset_size"], job["batch_size"])
    plan, s.dealer, s.run = scheduler_restart.build(cfg, job, steps, tasks_per_step)
    s.shard_map = [{"index": k, "endpoint": s.servers[k]["endpoint"], "lo": lo, "hi": hi}
                   for k, (lo, hi) in enumerate(ranges)]
    try:
        manifest, start = (s.recovery.resume(ranges[-1][1], plan, s.run) if cfg.resume
                           else (None, 0))
    except ValueError as exc:             # e.g. a checkpoint of another model
        s.fail(f"cannot resume: {exc}")
        return
    scheduler_restart.formed(s, job, steps, tasks_per_step, start)     # on disk before any reply
    now = time.monotonic()
    for ident, rid, role, index in s.held:
        member = s.members.members[(role, index)]
        member.last_seen = now              # liveness is judged from formation on
        if role == "server":
            lo, hi = ranges[index]
            s.reply(ident, Kind.OK, rid, shard=index, inc=member.inc, lo=lo, hi=hi,
                    optimizer=job["optimizer"], mode=cfg.mode, staleness=cfg.staleness,
                    workers=cfg.workers, checkpoint_every=cfg.checkpoint_every,
                    checkpoint_dir=cfg.checkpoint_dir, restore=manifest)
        else:
            welcome(s, ident, rid, index, member.inc, start_step=start)
    s.held.clear()
    s.phase = "training"
    s.deadline = time.monotonic() + cfg.timeout_s
    log.info("cluster formed: %d servers, %d workers, %d steps of %d samples, %s",
             cfg.servers, cfg.workers, steps, job["batch_size"], cfg.mode)
    for k, (lo, hi) in enumerate(ranges):       # which tensors each shard holds (or part of)
        names = sharding.tensors_in(specs, lo, hi)
        log.info("shard %d: elements [%d, %d), %s", k, lo, hi, ", ".join(names) if len(names) <= 4
                 else f"{len(names)} tensors from {names[0]} to {names[-1]}")


def welcome(s, ident, rid: int, worker: int, inc: int, start_step: int) -> None:
    """A worker's REGISTER answered: its id and incarnation, the shard map, the run, and our
    dead-after time (the worker counts us lost after as long, and a restart's time more)."""
    cfg = s.config
    s.reply(ident, Kind.OK, rid, worker=worker, inc=inc, shards=s.shard_map, mode=cfg.mode,
            staleness=cfg.staleness, steps=s.run.steps, workers=cfg.workers, seed=cfg.seed,
            start_step=start_step, dead_after_s=cfg.dead_after_s)
