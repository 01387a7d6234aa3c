"""Forming: the cluster's first phase, from the first REGISTER to every member's configuration.

While the cluster forms, each REGISTER is checked (``ps.scheduler.registration``) and its
reply is held (``Scheduler.held``). When all S servers and M workers have joined, ``_form``
cuts the model's flat parameters into S ranges (``ps.core.sharding``), plans the run's steps
and tasks (``plan_run``), resumes from a checkpoint if asked
(``ps.reliability.server_recovery``), journals the formation (on disk before any reply) and
answers every held REGISTER: a server with its range, the optimizer and the mode; a worker
with the shard map and the steps to run (``_welcome``, which also answers a replacement
joining mid-run).

``Forming`` holds these as methods of the scheduler: ``Scheduler`` inherits them, so they
read and change its state as its own methods do (this file is the forming part of it).
"""
from __future__ import annotations

import logging
import time

from ps.core import sharding
from ps.core.dealer import Dealer
from ps.core.tasks import TaskPlan, steps_per_epoch
from ps.scheduler import registration
from ps.scheduler.config import SchedulerConfig, crash_at, default_tasks_per_step
from ps.scheduler.runstate import RunState
from ps.wire.protocol import Error, Kind, ProtocolError

log = logging.getLogger("ps.scheduler")


def lr_versions(job: dict, mode: str, steps: int, tasks_per_step: int) -> int | None:
    """How many rates a job's schedule (``lr_at``) is sent for: one per version a shard
    can reach. BSP makes one update a step; an SSP or ASP shard one per push, and a push
    holds at least one of a step's at most ``tasks_per_step`` tasks. None: no schedule."""
    if not job.get("lr_at") or mode == "diloco":      # DiLoCo: the workers' inner recipe
        return None
    return steps if mode == "bsp" else steps * tasks_per_step


def server_optimizer(cfg: SchedulerConfig, job: dict, steps: int, tasks_per_step: int) -> dict:
    """What a server's REGISTER reply says of its optimizer. DiLoCo: the outer optimizer,
    on a BSP shard whose versions are rounds (the inner recipe runs on the workers); async,
    on an SSP shard that takes each push as 1/M of a round, with SGD's momentum delayed."""
    if cfg.mode == "diloco":
        return {"optimizer": registration.outer_optimizer(cfg, job["outer_optimizer"]), "param_groups": None,
                "clip": None, "lr_versions": None,
                "pushes_per_round": cfg.workers if cfg.diloco_async else 1}
    return {"optimizer": job["optimizer"], "param_groups": job.get("param_groups"),
            "clip": job.get("clip"), "lr_versions": lr_versions(job, cfg.mode, steps, tasks_per_step)}


def plan_run(cfg: SchedulerConfig, job: dict, steps: int,
             tasks_per_step: int) -> tuple[TaskPlan, Dealer, RunState]:
    """The task plan, the dealer and the run accounting of a run (forming, and a restarted
    scheduler's replay)."""
    plan = TaskPlan(job["dataset_size"], job["batch_size"], tasks_per_step,
                    seed=cfg.seed, shuffle=bool(job["shuffle"]))
    if cfg.mode == "diloco" and cfg.diloco_async:   # a pool, as ASP's; rounds: leases
        dealer = Dealer(plan, cfg.workers, steps, per_epoch=True, steal=cfg.steal)
        return plan, dealer, RunState(steps, cfg.workers, plan.steps_per_epoch)
    if cfg.mode == "diloco":      # rounds of H steps, part j of each step worker j's, no stealing
        dealer = Dealer(plan, cfg.workers, steps, steal=False, steps_per_round=cfg.inner_steps)
        return plan, dealer, RunState(dealer.rounds, cfg.workers, plan.steps_per_epoch)
    dealer = Dealer(plan, cfg.workers, steps, per_epoch=cfg.mode == "asp", steal=cfg.steal,
                    adaptive=cfg.tasks_per_step is None)
    return plan, dealer, RunState(steps, cfg.workers, plan.steps_per_epoch)


def shard_mode(cfg: SchedulerConfig) -> str:
    """The servers' consistency: DiLoCo's shards are BSP shards whose versions are rounds;
    async DiLoCo's are SSP shards whose clocks are each worker's rounds."""
    if cfg.mode != "diloco":
        return cfg.mode
    return "ssp" if cfg.diloco_async else "bsp"


def tasks_per_step_of(cfg: SchedulerConfig, job: dict) -> int:
    """The finest cut of a step: --tasks-per-step, or the adaptive grain's; in DiLoCo one
    part per worker (worker j trains on part j of every step of its round)."""
    if cfg.mode == "diloco":
        return cfg.workers
    return cfg.tasks_per_step or default_tasks_per_step(job["batch_size"], cfg.workers)


class Forming:
    """The scheduler's forming phase (mixed into ``Scheduler``)."""

    def on_register(self, ident, header) -> None:
        """A REGISTER: a member back after our restart, a replacement worker mid-run, or
        (while forming) a new member, held until everyone has joined."""
        if isinstance(header.get("inc"), int) and header["inc"] > 0:   # back after our restart
            return self._register_again(ident, header)
        if self.phase == "training" and header["role"] == "worker":    # a replacement
            index, inc, start = self.failover.replace(header, self.workers[0], self.dealer, self.run)
            return self._welcome(ident, header["rid"], index, inc, start_step=max(start, 0))
        if self.phase == "failed":
            raise ProtocolError(Error.RUN_OVER, f"the run failed: {self.failure}")
        if self.phase in ("finishing", "stopping") and header["role"] == "worker":
            raise ProtocolError(Error.RUN_OVER, f"training is over ({self.phase}): no worker is needed")
        if self.phase != "forming":
            raise ProtocolError(Error.BAD_FIELD, "the cluster has already formed")
        index = registration.admit(header, self.servers, self.workers, self.config)
        self.members.join(header["role"], index, time.monotonic())
        self.held.append((ident, header["rid"], header["role"], index))
        log.info("%s %d registered", header["role"], index)
        crash_at(self.config, "register", len(self.held))
        if len(self.servers) == self.config.servers and len(self.workers) == self.config.workers:
            self._form()

    def _form(self) -> None:
        """Everyone has joined: cut, plan, (resume,) journal, answer every held REGISTER."""
        cfg, job = self.config, self.workers[0]
        specs = sharding.layout([(name, shape) for name, shape in job["layout"]])
        ranges = sharding.cut(sharding.total_size(specs), cfg.servers)
        tasks_per_step = tasks_per_step_of(cfg, job)
        steps = cfg.steps or (cfg.epochs or job["epochs"] or 1) * steps_per_epoch(
            job["dataset_size"], job["batch_size"])
        plan, self.dealer, self.run = plan_run(cfg, job, steps, tasks_per_step)
        self.shard_map = [{"index": k, "endpoint": self.servers[k]["endpoint"], "lo": lo, "hi": hi}
                          for k, (lo, hi) in enumerate(ranges)]
        try:
            manifest, start = (self.recovery.resume(ranges[-1][1], plan, self.run) if cfg.resume
                               else (None, 0))
        except ValueError as exc:             # e.g. a checkpoint of another model
            self.fail(f"cannot resume: {exc}")
            return
        self.journal.formed(                  # on disk before any reply
            shards=self.shard_map, job=job, steps=steps, tasks_per_step=tasks_per_step,
            start=start, losses_before=self.run.losses()[:start],
            resumed_from=self.recovery.resumed_from,
            members=[[r, i, self.members.members[(r, i)].inc] for _, _, r, i in self.held])
        now = time.monotonic()
        for ident, rid, role, index in self.held:
            member = self.members.members[(role, index)]
            member.last_seen = now              # liveness is judged from formation on
            if role == "server":
                lo, hi = ranges[index]
                self.reply(ident, Kind.OK, rid, shard=index, inc=member.inc, lo=lo, hi=hi,
                           mode=shard_mode(cfg),
                           staleness=cfg.staleness, workers=cfg.workers,
                           checkpoint_every=cfg.checkpoint_every,
                           checkpoint_dir=cfg.checkpoint_dir, restore=manifest,
                           sparse=job.get("sparse"), seed=cfg.seed, servers=cfg.servers,
                           out=cfg.out,
                           **server_optimizer(cfg, job, steps, tasks_per_step))
            else:
                self._welcome(ident, rid, index, member.inc, start_step=start)
        self.held.clear()
        self.phase = "training"
        self.deadline = time.monotonic() + cfg.timeout_s
        log.info("cluster formed: %d servers, %d workers, %d steps of %d samples, %s",
                 cfg.servers, cfg.workers, steps, job["batch_size"], cfg.mode)
        for k, (lo, hi) in enumerate(ranges):       # which tensors each shard holds (or part of)
            names = sharding.tensors_in(specs, lo, hi)
            log.info("shard %d: elements [%d, %d), %s", k, lo, hi, ", ".join(names)
                     if len(names) <= 4 else f"{len(names)} tensors from {names[0]} to {names[-1]}")

    def _welcome(self, ident, rid: int, worker: int, inc: int, start_step: int) -> None:
        """A worker's REGISTER answered: its id and incarnation, the shard map, the run, and
        our dead-after time (the worker counts us lost after as long, and a restart's time more)."""
        cfg = self.config
        self.reply(ident, Kind.OK, rid, worker=worker, inc=inc, shards=self.shard_map,
                   mode=cfg.mode, staleness=cfg.staleness, steps=self.run.steps,
                   workers=cfg.workers, seed=cfg.seed, start_step=start_step,
                   dead_after_s=cfg.dead_after_s, inner_steps=cfg.inner_steps,
                   diloco_async=cfg.diloco_async,
                   lr_versions=lr_versions(self.workers[0], cfg.mode, self.run.steps,
                                           self.dealer.plan.tasks_per_step))
