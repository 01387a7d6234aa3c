"""The scheduler: membership, the shard map, task leases, progress and the run summary.

Start it with ``python -m ps.scheduler --servers S --workers M``. It never touches
tensor bytes: it is the control path only. A run goes through four phases:

    forming   every server and worker registers; registration replies are held
              until all S + M have joined, then each gets its configuration
              (a server: its shard's range, the optimizer, the mode; a worker: the
              shard map and how many steps to run)
    training  workers lease their tasks step by step and report losses
    finishing every worker has sent DONE; worker 0 pulls the final parameters,
              writes them and sends FINISHED
    stopping  each server's next heartbeat (carrying its final counters) is
              answered with stop; then summary.json is written and we exit

Every phase has a deadline; when one passes, the scheduler names what it is still
waiting for and exits non-zero rather than hang.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import signal
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

import zmq

from . import checkpoint, netfaults, sharding, wire
from .protocol import Error, Kind, ProtocolError, check_frames, check_int_list, decode, encode
from .runstate import RunState
from .dealer import Dealer
from .membership import DEAD_AFTER_S, Membership
from .optim import make_optimizer
from .tasks import TaskPlan
from .trace import Tracer

log = logging.getLogger("ps.scheduler")

TASKS_PER_WORKER = 4       # default tasks per worker per step (the grain of stealing)
MIN_TASK_SAMPLES = 16      # default tasks are never smaller than this
REPLY_CACHE = 8192         # replies remembered by (identity, rid) to answer repeats


@dataclass
class SchedulerConfig:
    servers: int = 2
    workers: int = 2
    mode: str = "bsp"
    staleness: int = 0
    steps: int | None = None             # total global steps; default: epochs x steps per epoch
    epochs: int | None = None            # default: the job's EPOCHS, else 1
    seed: int = 0
    tasks_per_step: int | None = None    # default: see default_tasks_per_step
    steal: bool = True                   # work stealing and speed-proportional dealing
    trace: bool = False                  # write trace/scheduler.json into out
    bind: str = "tcp://127.0.0.1:*"
    endpoint_file: str | None = None     # where to write the bound endpoint (for launchers)
    out: str | None = None               # where summary.json goes
    timeout_s: float = 120.0             # per phase: forming, a step without progress, finishing
    dead_after_s: float = DEAD_AFTER_S   # silence after which a worker or server is declared dead
    checkpoint_every: int = 0            # BSP: a coordinated checkpoint every K steps (0: none)
    checkpoint_dir: str | None = None    # where shards write them and manifests commit them
    resume: bool = False                 # start from the newest intact checkpoint there


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.ctx = zmq.Context()
        self.router = wire.make_socket(self.ctx, zmq.ROUTER)
        self.router.bind(config.bind)
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.phase = "forming"
        self.servers: dict[int, dict] = {}       # shard index -> registration
        self.workers: dict[int, dict] = {}       # worker id -> registration
        self.held: list[tuple] = []              # (ident, rid, role, index): replies held until formed
        self.done_waiting: list[tuple] = []      # (ident, rid): DONE replies held until all are done
        self.shard_stats: dict[int, dict] = {}
        self.stopped: set[int] = set()           # shards told to stop
        self.run: RunState | None = None
        self.dealer: Dealer | None = None
        self.deadline = time.monotonic() + config.timeout_s
        self.failure: str | None = None
        self.next_round = 0                      # ASP: the next epoch to deal
        self.members = Membership(config.dead_after_s)
        self.lease_step: dict[int, int] = {}     # worker -> latest step it leased
        self.deaths: list[dict] = []             # each death verdict, for the summary
        self.rejoins: list[dict] = []            # each replacement that joined mid-run
        self.committed = 0                       # newest checkpoint version with a manifest
        self.resumed_from: dict | None = None
        self.finisher: int | None = None         # the worker that writes the final parameters
        self.t0 = time.monotonic()
        self.answered: OrderedDict = OrderedDict()   # (identity, rid) -> reply, for repeats
        self.tracer = Tracer(config.out if config.trace else None, "scheduler", 0)

    # -- the loop -------------------------------------------------------------------
    def serve(self) -> int:
        if self.config.endpoint_file:
            wire.write_endpoint(self.config.endpoint_file, self.endpoint)
        log.info("scheduler at %s", self.endpoint)
        while self.phase != "exit":
            if self.router.poll(100):
                frames = self.router.recv_multipart(copy=False)
                self.handle(frames)
            if self.phase not in ("forming", "exit"):
                self._check_liveness()
            if time.monotonic() > self.deadline:
                self._on_deadline()
        self.write_summary()
        self.tracer.write()
        return 0 if self.failure is None else 1

    def _on_deadline(self) -> None:
        waiting = {
            "forming": lambda: "servers " + str(sorted(set(range(self.config.servers)) - set(self.servers)))
                               + " and workers " + str(sorted(set(range(self.config.workers)) - set(self.workers))),
            "training": lambda: self.run.diagnose(),
            "finishing": lambda: f"worker {self.finisher} to write the final parameters (FINISHED)",
            "stopping": lambda: "final heartbeats from servers "
                                + str(sorted(set(range(self.config.servers)) - self.stopped)),
        }[self.phase]()
        self.failure = f"{self.phase}: no progress for {self.config.timeout_s:.0f} s; waiting for {waiting}"
        log.error("%s", self.failure)
        self.phase = "exit"

    def handle(self, frames: list) -> None:
        ident, rid = frames[0].bytes, 0
        try:
            if len(frames) < 2:
                raise ProtocolError(Error.BAD_FRAMES, "a request needs a header frame")
            header = decode(frames[1])
            rid = header["rid"]
            check_frames(header["kind"], frames[2:])
            if self._repeat(ident, rid):
                return
            handler = {Kind.REGISTER: self.on_register, Kind.HEARTBEAT: self.on_heartbeat,
                       Kind.LEASE: self.on_lease, Kind.REPORT: self.on_report,
                       Kind.DONE: self.on_done, Kind.FINISHED: self.on_finished,
                       Kind.STATUS: self.on_status}.get(header["kind"])
            if handler is None:
                raise ProtocolError(Error.UNKNOWN_KIND, f"the scheduler does not serve {header['kind']!r}")
            handler(ident, header)
        except ProtocolError as exc:
            self.reply(ident, Kind.ERROR, rid, code=exc.code, reason=exc.reason)
        except Exception as exc:   # a bug, not bad input: report it, keep serving
            log.exception("internal error handling a request")
            self.reply(ident, Kind.ERROR, rid, code=Error.INTERNAL, reason=repr(exc))

    def _repeat(self, ident: bytes, rid: int) -> bool:
        """Idempotence by request id: a request seen before (a Lazy Pirate resend, or a
        message duplicated on the wire) gets its first answer again, or nothing while
        that answer is still deferred; it is never handled twice."""
        key = (ident, rid)
        if key in self.answered:
            self._send(ident, self.answered[key])
            return True
        return any((i, r) == key for i, r, *_ in self.held + self.done_waiting)

    def reply(self, ident, kind: str, rid: int, **fields) -> None:
        message = encode(kind, rid, **fields)
        self.answered[(ident, rid)] = message
        if len(self.answered) > REPLY_CACHE:
            self.answered.popitem(last=False)
        self._send(ident, message)

    def _send(self, ident: bytes, message: bytes) -> None:
        try:
            netfaults.send(self.router, [ident, message])
        except zmq.ZMQError as exc:
            log.warning("reply to a vanished peer dropped: %s", exc)

    # -- forming --------------------------------------------------------------------
    def on_register(self, ident, header) -> None:
        if self.phase == "training" and header["role"] == "worker":
            return self._replace_worker(ident, header)
        if self.phase != "forming":
            raise ProtocolError(Error.BAD_FIELD, "the cluster has already formed")
        if header["role"] == "server":
            index = self._pick_index(header.get("shard"), self.servers, self.config.servers, "shard")
            if not isinstance(header.get("endpoint"), str):
                raise ProtocolError(Error.MISSING_FIELD, "a server registers its endpoint")
            self.servers[index] = {"endpoint": header["endpoint"]}
        elif header["role"] == "worker":
            index = self._register_worker(header)
        else:
            raise ProtocolError(Error.BAD_FIELD, f"unknown role {header['role']!r}")
        self.members.join(header["role"], index, time.monotonic())
        self.held.append((ident, header["rid"], header["role"], index))
        log.info("%s %d registered", header["role"], index)
        if len(self.servers) == self.config.servers and len(self.workers) == self.config.workers:
            self._form()

    def _register_worker(self, header) -> int:
        info = {k: header.get(k) for k in ("layout", "dataset_size", "batch_size", "shuffle",
                                           "optimizer", "epochs")}
        index = self._pick_index(header.get("worker"), self.workers, self.config.workers, "worker")
        if not (isinstance(info["layout"], list) and isinstance(info["dataset_size"], int)
                and isinstance(info["batch_size"], int) and isinstance(info["optimizer"], dict)):
            raise ProtocolError(Error.MISSING_FIELD, "a worker registers its layout, dataset_size, "
                                                     "batch_size and optimizer")
        try:
            make_optimizer(info["optimizer"], 1)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(Error.BAD_FIELD, f"optimizer {info['optimizer']}: {exc}") from None
        if header.get("seed") != self.config.seed:
            raise ProtocolError(Error.BAD_FIELD, f"worker seed {header.get('seed')!r} differs from "
                                                 f"the scheduler's {self.config.seed}")
        for other in self.workers.values():
            if other != info:
                raise ProtocolError(Error.BAD_FIELD, "this worker's job differs from the others' "
                                                     "(model layout, data set or optimizer)")
        self.workers[index] = info
        return index

    @staticmethod
    def _pick_index(wanted, taken: dict, count: int, what: str) -> int:
        """The index a role asked for (launchers pin them), else the lowest free one."""
        if not (isinstance(wanted, int) and not isinstance(wanted, bool)) or wanted < 0:
            wanted = next((i for i in range(count) if i not in taken), count)
        if wanted >= count or wanted in taken:
            raise ProtocolError(Error.BAD_FIELD, f"{what} {wanted} is taken or out of range [0, {count})")
        return wanted

    def _form(self) -> None:
        cfg, job = self.config, self.workers[0]
        specs = sharding.layout([(name, shape) for name, shape in job["layout"]])
        ranges = sharding.cut(sharding.total_size(specs), cfg.servers)
        tasks_per_step = cfg.tasks_per_step or default_tasks_per_step(job["batch_size"], cfg.workers)
        plan = TaskPlan(job["dataset_size"], job["batch_size"], tasks_per_step,
                        seed=cfg.seed, shuffle=bool(job["shuffle"]))
        steps = cfg.steps or (cfg.epochs or job["epochs"] or 1) * plan.steps_per_epoch
        self.dealer = Dealer(plan, cfg.workers, steps, per_epoch=cfg.mode == "asp", steal=cfg.steal)
        self.run = RunState(steps, cfg.workers, plan.steps_per_epoch)
        shards = [{"index": k, "endpoint": self.servers[k]["endpoint"], "lo": lo, "hi": hi}
                  for k, (lo, hi) in enumerate(ranges)]
        self.shard_map = shards
        manifest, start = self._resume_point(ranges[-1][1])
        now = time.monotonic()
        for ident, rid, role, index in self.held:
            member = self.members.members[(role, index)]
            member.last_seen = now              # liveness is judged from formation on
            if role == "server":
                lo, hi = ranges[index]
                self.reply(ident, Kind.OK, rid, shard=index, inc=member.inc, lo=lo, hi=hi,
                           optimizer=job["optimizer"], mode=cfg.mode, staleness=cfg.staleness,
                           workers=cfg.workers, checkpoint_every=cfg.checkpoint_every,
                           checkpoint_dir=cfg.checkpoint_dir, restore=manifest)
            else:
                self._welcome(ident, rid, index, member.inc, start_step=start)
        self.held.clear()
        self.phase = "training"
        self.deadline = time.monotonic() + cfg.timeout_s
        log.info("cluster formed: %d servers, %d workers, %d steps of %d samples, %s",
                 cfg.servers, cfg.workers, steps, job["batch_size"], cfg.mode)

    def _resume_point(self, total: int) -> tuple[dict | None, int]:
        """With --resume: the newest intact checkpoint and the step to go on from. The
        steps before it are complete on every shard (BSP version = steps applied), so
        their samples count as applied."""
        if not self.config.resume:
            return None, 0
        manifest, skipped = checkpoint.latest_intact(self.config.checkpoint_dir)
        for reason in skipped:
            log.warning("checkpoint skipped: %s", reason)
        if manifest is None:
            log.warning("no intact checkpoint in %s: starting from step 0", self.config.checkpoint_dir)
            return None, 0
        if manifest["shards"][-1]["hi"] != total:
            raise ValueError(f"checkpoint holds {manifest['shards'][-1]['hi']} parameters, "
                             f"the model has {total}")
        start = manifest["version"]
        plan, spe = self.dealer.plan, self.dealer.plan.steps_per_epoch
        for step in range(start):
            for task in plan.tasks(step):
                self.run.count_task(task.id, step // spe, len(task.samples), rejected=False)
        for step, loss in enumerate(manifest.get("losses", [])[:start]):
            self.run.loss_sum[step], self.run.loss_samples[step] = loss, 1
        self.committed = start
        self.resumed_from = {"version": start, "skipped": skipped}
        log.warning("resuming from the checkpoint of version %d", start)
        return manifest, start

    def _commit_checkpoint(self) -> None:
        """Once every shard has written the same version, write the manifest (the commit)."""
        reports = [st.get("checkpoint") for st in self.shard_stats.values()]
        if len(reports) < self.config.servers or not all(reports):
            return
        versions = {r["version"] for r in reports}
        version = min(versions)
        if len(versions) != 1 or version <= self.committed:
            return
        losses = self.run.losses() if len(self.run.loss_samples) >= version else []
        checkpoint.write_manifest(self.config.checkpoint_dir, version, reports,
                                  {"servers": self.config.servers, "losses": losses[:version]})
        self.committed = version
        self.tracer.instant("checkpoint", "fault", version=version)
        log.info("checkpoint of version %d committed", version)

    def _welcome(self, ident, rid: int, worker: int, inc: int, start_step: int) -> None:
        cfg = self.config
        self.reply(ident, Kind.OK, rid, worker=worker, inc=inc, shards=self.shard_map, mode=cfg.mode,
                   staleness=cfg.staleness, steps=self.run.steps, workers=cfg.workers, seed=cfg.seed,
                   start_step=start_step)

    def _replace_worker(self, ident, header) -> None:
        """A worker joining mid-run takes the id of a dead one, with a new incarnation, and
        starts at the step (or clock) the slowest live worker is on."""
        dead = [w for w in range(self.config.workers) if w not in self.members.live("worker")]
        wanted = header.get("worker")
        index = wanted if wanted in dead else (dead[0] if dead and wanted in (None, -1) else None)
        if index is None:
            # The worker it replaces may not have been declared dead yet: ask it to retry.
            raise ProtocolError(Error.NOT_READY, f"no dead worker to replace (asked for {wanted!r})")
        info = {k: header.get(k) for k in ("layout", "dataset_size", "batch_size", "shuffle",
                                           "optimizer", "epochs")}
        if info != self.workers[0] or header.get("seed") != self.config.seed:
            raise ProtocolError(Error.BAD_FIELD, "the replacement's job differs from the cluster's")
        member = self.members.join("worker", index, time.monotonic())
        self.dealer.revive(index)
        self.run.revive(index)
        live_steps = [self.lease_step.get(w, 0) for w in self.members.live("worker") if w != index]
        start = -1 if self.config.mode == "asp" else min(live_steps, default=0)
        self.lease_step[index] = start
        log.warning("worker %d rejoins as incarnation %d at step %d", index, member.inc, start)
        self.tracer.instant("rejoin", "fault", worker=index, inc=member.inc, step=start)
        self.rejoins.append({"worker": index, "incarnation": member.inc, "start_step": start,
                             "at_s": round(time.monotonic() - self.t0, 3)})
        self._welcome(ident, header["rid"], index, member.inc, start_step=max(start, 0))

    # -- liveness -------------------------------------------------------------------
    def _check_liveness(self) -> None:
        for member in self.members.overdue(time.monotonic()):
            if member.role == "worker":
                self._worker_died(member)
            elif self.phase in ("training", "finishing"):
                self.failure = (f"server {member.index} silent for {self.config.dead_after_s:.1f} s; "
                                "the run cannot continue without it")
                log.error("%s", self.failure)
                self.phase = "exit"
                return

    def _worker_died(self, member) -> None:
        """Fence the incarnation, deal its tasks again, and let the run go on without it."""
        self.members.retire(member)
        live = self.members.live("worker")
        if self.config.mode == "bsp":
            # Tasks of steps every shard has completed were applied: nothing to redo.
            versions = [st.get("version", 0) for st in self.shard_stats.values()]
            complete_below = min(versions) if len(versions) == self.config.servers else 0
            done = [t.id for w, t in self.dealer.leases.values()
                    if w == member.index and t.step < complete_below]
            spe = self.dealer.plan.steps_per_epoch
            for task in self.dealer.complete(done):
                self.run.count_task(task.id, task.step // spe, len(task.samples), rejected=False)
        redealt = self.dealer.reassign(member.index, live) if live else []
        self.run.mark_dead(member.index)
        death = {"worker": member.index, "incarnation": member.inc,
                 "detected_at_s": round(time.monotonic() - self.t0, 3), "tasks_redealt": len(redealt)}
        self.deaths.append(death)
        self.tracer.instant("death", "fault", **death)
        log.warning("worker %d (incarnation %d) declared dead; %d leased tasks dealt again",
                    member.index, member.inc, len(redealt))
        if not live and self.phase == "training":
            self.failure = "every worker is dead"
            self.phase = "exit"
        elif self.phase == "finishing" and member.index == self.finisher:
            self.failure = f"worker {member.index} died while writing the final parameters"
            self.phase = "exit"
        else:
            self._release_done()

    # -- training -------------------------------------------------------------------
    def on_lease(self, ident, header) -> None:
        """Lease the worker's next task: BSP from its step, SSP from its clock or older
        rounds, ASP from any dealt epoch. None means: nothing left for this step/clock
        (or, in ASP, for the run)."""
        self._check_training(header)
        worker, step = header["worker"], header["step"]
        if self.config.mode == "asp":
            task, victim = self._lease_asp(worker)
        elif step == -1:                 # "anything dealt again?" from a worker done stepping
            rounds = sorted(self.dealer.deques)
            task, victim = self.dealer.take(worker, rounds, rounds)
        else:
            if not 0 <= step < self.run.steps:
                raise ProtocolError(Error.BAD_FIELD, f"step {step} outside [-1, {self.run.steps})")
            self.dealer.deal(step)
            rounds = [step] if self.config.mode == "bsp" else sorted(r for r in self.dealer.deques if r <= step)
            task, victim = self.dealer.take(worker, rounds, rounds)
            self.lease_step[worker] = max(self.lease_step.get(worker, 0), step)
        self.run.started()
        if victim is not None:
            self.tracer.instant("steal", "steal", thief=worker, victim=victim, task=task.id,
                                tasks=self.dealer.steal_log[-1][3])
        self.reply(ident, Kind.OK, header["rid"], task=task.to_wire() if task else None,
                   step_tasks=self.dealer.plan.num_tasks(task.step) if task else 0,
                   redo=bool(task and task.id in self.dealer.redo))

    def _lease_asp(self, worker: int):
        """ASP deals a whole epoch at a time; the next only when the current is drained."""
        while True:
            rounds = sorted(self.dealer.deques)
            task, victim = self.dealer.take(worker, rounds, rounds)
            if task is not None or self.next_round >= self.dealer.rounds:
                return task, victim
            self.dealer.deal(self.next_round)
            self.next_round += 1

    def on_report(self, ident, header) -> None:
        """A worker pushed some tasks' gradients; ``rejected`` lists those a shard refused
        as already applied."""
        self._check_training(header)
        ids = check_int_list(header, "tasks", 1 << 16)
        rejected = set(check_int_list(header, "rejected", 1 << 16))
        worker = header["worker"]
        tasks = self.dealer.complete(ids)
        spe = self.dealer.plan.steps_per_epoch
        for task in tasks:
            self.run.count_task(task.id, task.step // spe, len(task.samples), task.id in rejected)
        compute_s, samples = float(header["compute_s"]), header["samples"]
        if compute_s > 0 and samples:
            self.dealer.note_speed(worker, samples / compute_s)
        self.run.report(worker, header["step"], len(ids), samples, float(header["loss_sum"]),
                        compute_s, float(header["wait_s"]))
        self.deadline = time.monotonic() + self.config.timeout_s
        self.reply(ident, Kind.OK, header["rid"])
        self._release_done()            # the last task dealt again may just have come back

    def on_done(self, ident, header) -> None:
        self._check_training(header)
        self.run.done(header["worker"])
        self.done_waiting.append((ident, header["rid"], header["worker"]))
        self._release_done()

    def _release_done(self) -> None:
        """Once every live worker is done and no task is left (a dead worker's tasks may
        have been dealt again to workers already waiting here), answer their DONE; one
        of them finishes the run."""
        if (self.phase != "training" or not self.done_waiting or not self.run.all_done()
                or self.dealer.unfinished()):
            return
        self.run.finish()
        waiting = {w for _, _, w in self.done_waiting}
        self.finisher = min(w for w in self.members.live("worker") if w in waiting)
        for ident, rid, worker in self.done_waiting:
            self.reply(ident, Kind.OK, rid, finisher=worker == self.finisher)
        self.done_waiting.clear()
        self.phase = "finishing"
        self.deadline = time.monotonic() + self.config.timeout_s

    def on_finished(self, ident, header) -> None:
        if self.phase != "finishing" or header["worker"] != self.finisher:
            raise ProtocolError(Error.NOT_READY, f"FINISHED from worker {header['worker']} "
                                                 f"in phase {self.phase}")
        self.reply(ident, Kind.OK, header["rid"])
        self.phase = "stopping"
        self.deadline = time.monotonic() + self.config.timeout_s

    def _check_training(self, header) -> None:
        if self.phase not in ("training", "finishing"):
            raise ProtocolError(Error.NOT_READY, f"the cluster is {self.phase}")
        if not 0 <= header["worker"] < self.config.workers:
            raise ProtocolError(Error.UNKNOWN_SENDER, f"unknown worker {header['worker']}")
        self.members.seen("worker", header["worker"], header["inc"], time.monotonic())

    # -- servers and observers ------------------------------------------------------
    def on_heartbeat(self, ident, header) -> None:
        """Servers and workers say they are alive. A server's reply lists the incarnations
        to fence and says when to stop; a retired incarnation gets FENCED."""
        role, index = header["role"], header["index"]
        if role not in ("server", "worker"):
            raise ProtocolError(Error.BAD_FIELD, f"unknown role {role!r}")
        self.members.seen(role, index, header["inc"], time.monotonic())
        if role == "worker":
            self.reply(ident, Kind.OK, header["rid"])
            return
        if isinstance(header.get("stats"), dict):
            self.shard_stats[index] = header["stats"]
            if self.config.checkpoint_every and self.run is not None:
                self._commit_checkpoint()
        stop = self.phase == "stopping"
        self.reply(ident, Kind.OK, header["rid"], stop=stop, fenced=self.members.fenced)
        if stop:
            self.stopped.add(index)
            if len(self.stopped) == self.config.servers:
                self.phase = "exit"

    def on_status(self, ident, header) -> None:
        status = {"phase": self.phase, "max_staleness": self._max_staleness()}
        if self.run:
            status.update(self.run.progress())
        self.reply(ident, Kind.OK, header["rid"], **status)

    def _max_staleness(self) -> int:
        return max((s.get("max_staleness", 0) for s in self.shard_stats.values()), default=0)

    def write_summary(self) -> None:
        if not self.config.out or self.run is None:
            return
        cfg = self.config
        summary = {"mode": cfg.mode, "staleness": cfg.staleness, "servers": cfg.servers,
                   "workers": cfg.workers, "seed": cfg.seed, "ok": self.failure is None,
                   "failure": self.failure, "steal": cfg.steal,
                   "tasks_per_step": self.dealer.plan.tasks_per_step,
                   **self.run.summary(self.dealer.stolen_by, self.dealer.stolen_from),
                   "max_staleness": self._max_staleness(),
                   "duplicates_rejected": sum(s.get("duplicates_rejected", 0)
                                              for s in self.shard_stats.values()),
                   "fenced_rejected": sum(s.get("fenced_rejected", 0)
                                          for s in self.shard_stats.values()),
                   "deaths": self.deaths, "rejoins": self.rejoins,
                   "checkpoint_committed": self.committed, "resumed_from": self.resumed_from,
                   "shards": [self.shard_stats.get(k, {}) for k in range(cfg.servers)]}
        os.makedirs(cfg.out, exist_ok=True)
        tmp = os.path.join(cfg.out, "summary.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, os.path.join(cfg.out, "summary.json"))

    def close(self) -> None:
        self.router.close(linger=0)
        self.ctx.term()


def default_tasks_per_step(batch_size: int, workers: int) -> int:
    """Four tasks per worker per step, so stealing can move quarters of a worker's share,
    but none smaller than MIN_TASK_SAMPLES: a task's compute should dwarf the ~0.2 ms
    scheduler round trip of its lease (which the worker overlaps with compute anyway)."""
    return max(workers, min(TASKS_PER_WORKER * workers, batch_size // MIN_TASK_SAMPLES))


def parse_args(argv=None) -> SchedulerConfig:
    p = argparse.ArgumentParser(prog="python -m ps.scheduler",
                                description="Run the scheduler of a parameter-server cluster.")
    p.add_argument("--servers", type=int, default=2, help="number of servers (shards) S")
    p.add_argument("--workers", type=int, default=2, help="number of workers M")
    p.add_argument("--mode", choices=("bsp", "ssp", "asp"), default="bsp", help="consistency model")
    p.add_argument("--staleness", type=int, default=0, help="SSP staleness bound s (clocks)")
    p.add_argument("--steps", type=int, default=None, help="global steps to train")
    p.add_argument("--epochs", type=int, default=None, help="epochs to train (default: the job's EPOCHS)")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument("--tasks-per-step", type=int, default=None,
                   help="tasks each global batch is cut into (default: 4 per worker, >= 16 samples each)")
    p.add_argument("--no-steal", action="store_true",
                   help="deal tasks statically (equal round-robin shares, no stealing)")
    p.add_argument("--trace", action="store_true", help="write trace/scheduler.json into --out")
    p.add_argument("--bind", default=SchedulerConfig.bind, help="control endpoint (default: %(default)s)")
    p.add_argument("--endpoint-file", default=None, help="write the bound endpoint here")
    p.add_argument("--out", default=None, help="directory for summary.json")
    p.add_argument("--timeout-s", type=float, default=SchedulerConfig.timeout_s,
                   help="deadline of each phase without progress")
    p.add_argument("--dead-after-s", type=float, default=DEAD_AFTER_S,
                   help="declare a worker or server dead after this long without a heartbeat")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="BSP: a coordinated checkpoint every K steps (0: none)")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint directory (default: OUT/checkpoints)")
    p.add_argument("--resume", action="store_true",
                   help="start from the newest intact checkpoint in --checkpoint-dir")
    p.add_argument("--log-level", default="WARNING")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s scheduler %(levelname)s %(message)s")
    if a.servers < 1 or a.workers < 1 or a.staleness < 0:
        p.error("--servers and --workers must be >= 1 and --staleness >= 0")
    if (a.checkpoint_every or a.resume) and not (a.checkpoint_dir or a.out):
        p.error("checkpoints need --checkpoint-dir (or --out)")
    if a.checkpoint_every and a.mode != "bsp":
        p.error("coordinated checkpoints need --mode bsp (SSP and ASP shards are never at one version)")
    return SchedulerConfig(
        servers=a.servers, workers=a.workers, mode=a.mode, staleness=a.staleness, steps=a.steps,
        epochs=a.epochs, seed=a.seed, tasks_per_step=a.tasks_per_step, steal=not a.no_steal,
        trace=a.trace, bind=a.bind, endpoint_file=a.endpoint_file, out=a.out, timeout_s=a.timeout_s,
        dead_after_s=a.dead_after_s, checkpoint_every=a.checkpoint_every,
        checkpoint_dir=a.checkpoint_dir or (os.path.join(a.out, "checkpoints") if a.out else None),
        resume=a.resume)


def main(argv=None) -> int:
    netfaults.configure_from_env()
    scheduler = Scheduler(parse_args(argv))
    faulthandler.register(signal.SIGUSR1)   # `kill -USR1 PID` prints every thread's stack
    try:
        return scheduler.serve()
    except KeyboardInterrupt:
        return 130
    finally:
        scheduler.close()


if __name__ == "__main__":
    sys.exit(main())
