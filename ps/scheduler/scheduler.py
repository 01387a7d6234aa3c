"""The scheduler: membership, the shard map, task leases, progress and the run summary.

Start it with ``python -m ps.scheduler --servers S --workers M``. It never touches
tensor bytes: it is the control path only. A run goes through four phases:

    forming   every server and worker registers; registration replies are held
              until all S + M have joined, then each gets its configuration
              (a server: its shard's range, the optimizer, the mode; a worker: the
              shard map and how many steps to run)
    training  workers lease their tasks step by step and report losses
    finishing every worker has sent DONE; the lowest-numbered live worker pulls
              the final parameters, writes them and sends FINISHED
    stopping  each server's next heartbeat (carrying its final counters) is
              answered with stop; then summary.json is written and we exit

Every phase has a deadline; when one passes, the scheduler names what it is still
waiting for and exits non-zero rather than hang; a worker's report that the job's own
code raised ends any phase at once (``ps.scheduler.joberror``). With ``--journal`` it
records its decisions; restarted, it replays them and *re-forms* the cluster
(``ps.reliability.scheduler_restart``).

This module is the event loop: it receives a request, validates it, calls the code that
decides and sends the reply. The decisions live elsewhere:

    ps.scheduler.config                  the flags
    ps.scheduler.forming                 forming the cluster (methods of Scheduler)
    ps.scheduler.registration            what a REGISTER (or a server's heartbeat) must say
    ps.core.dealer                       dealing and stealing
    ps.scheduler.runstate                run accounting
    ps.reliability.worker_failover       dead workers and their replacements
    ps.reliability.server_recovery       checkpoint commits and --resume
    ps.reliability.scheduler_restart     journal replay (methods of Scheduler)
    ps.scheduler.diagnose                naming what a stalled step waits for
    ps.scheduler.finishing, summary      the end of a run and summary.json
"""
from __future__ import annotations

import faulthandler
import logging
import math
import signal
import time
from collections import OrderedDict

import zmq

from ps.core.dealer import Dealer
from ps.faults import messages
from ps.reliability.journal import Journal
from ps.reliability.scheduler_restart import Reform, Restart
from ps.reliability.server_recovery import Recovery
from ps.reliability.worker_failover import Failover
from ps.scheduler import diagnose, registration, summary
from ps.scheduler.config import SchedulerConfig, crash_at, parse_args
from ps.scheduler.finishing import Finishing
from ps.scheduler.forming import Forming
from ps.scheduler.membership import Membership
from ps.scheduler.norms import NormExchange
from ps.scheduler.runstate import RunState
from ps.security import curve
from ps.trace import Tracer
from ps.wire import transport, validation
from ps.wire.protocol import (Error, Kind, ProtocolError, check_frames, check_int_list, encode,
                              optional_bool, optional_int, request_header)

log = logging.getLogger("ps.scheduler")

REPLY_CACHE = 8192         # replies remembered by (identity, rid) to answer repeats
STOP_GRACE_S = 1.5         # after telling every server to stop: 3 heartbeats to repeat it


class Scheduler(Forming, Finishing, Restart):
    """The scheduler process. Its forming phase is in ``ps.scheduler.forming``, the end of
    a run in ``ps.scheduler.finishing`` and its restart from a journal in
    ``ps.reliability.scheduler_restart`` (methods it inherits); this class is the event
    loop, liveness and training."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.ctx = zmq.Context()
        self.router = transport.make_socket(self.ctx, zmq.ROUTER)
        self.auth = curve.secure_server(self.ctx, self.router)   # before bind: no gap
        self.router.bind(config.bind)
        curve.warn_if_exposed(config.bind, "scheduler")
        self.refusals = validation.RefusalLog(log)       # bad input logged at a bounded rate
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.phase = "forming"
        self.servers: dict[int, dict] = {}       # shard index -> registration
        self.workers: dict[int, dict] = {}       # worker id -> registration
        self.held: list[tuple] = []              # (ident, rid, role, index): replies held until formed
        self.done_waiting: list[tuple] = []      # (ident, rid): DONE replies held until all are done
        self.shard_stats: dict[int, dict] = {}
        self.worker_net_faults: dict[tuple, dict] = {}   # (worker, inc) -> its message faults
        self.shard_map: list[dict] | None = None  # each shard's index, endpoint, lo, hi, once formed
        self.stopped: set[int] = set()           # shards told to stop
        self.byes: set[int] = set()              # shards that said they heard it (bye)
        self.worker_byes: set[tuple[int, int]] = set()   # (worker, inc) that left after DONE
        self.run: RunState | None = None
        self.dealer: Dealer | None = None
        self.deadline = time.monotonic() + config.timeout_s
        self.failure: str | None = None
        self.job_error: dict | None = None       # the job error that failed the run (joberror)
        self.exit_at, self.done_at = None, 0.0   # when to exit (servers stopped); DONE answered
        self.next_round = 0                      # ASP: the next epoch to deal
        self.members = Membership(config.dead_after_s)
        self.finisher: int | None = None         # the worker that writes the final parameters
        self.t0 = time.monotonic()
        self.answered: OrderedDict = OrderedDict()   # (identity, rid) -> reply, for repeats
        self.tracer = Tracer(config.out if config.trace else None, "scheduler", 0)
        self.journal = Journal(config.journal)   # writes nothing without --journal
        self.failover = Failover(config, self.members, self.tracer, self.t0, self.journal)
        self.recovery = Recovery(config.checkpoint_dir, config.servers, self.tracer, self.journal)
        self.reform: Reform | None = None        # set when restarted from a journal
        self.next_stall_log = 0.0
        self.norms = NormExchange(config.servers)   # clipping: each BSP step's global norm

    # -- the loop -------------------------------------------------------------------
    def serve(self) -> int:
        if self.config.endpoint_file:
            transport.write_endpoint(self.config.endpoint_file, self.endpoint)
        log.info("scheduler at %s", self.endpoint)
        self.reform = self._start_from_journal()
        while self.phase != "exit":
            if self.router.poll(100):
                self.handle(self.router.recv_multipart(copy=False))
            try:
                self._tick()
            except Exception as exc:   # a bug, not bad input: end the run, with its summary
                log.exception("internal error")
                self.fail(f"internal error: {exc!r}")
        if self.config.out and (self.run is not None or self.failure is not None):
            summary.write(self.config.out, self._summary())
        self.tracer.write()
        return 0 if self.failure is None else 1

    def _tick(self) -> None:
        """Between messages: exit when due, liveness, re-forming, stall logs, the deadline."""
        if self.exit_at is not None and time.monotonic() >= self.exit_at:
            self.phase = "exit"
            return
        if self.phase == "failed":      # lingering after a job error: nothing left to decide
            return
        if self.phase not in ("forming", "exit"):
            self._check_liveness()
        if self.phase == "reforming":
            self.reform.check()
        if self.phase == "training" and time.monotonic() > self.next_stall_log:
            quiet_s = time.monotonic() - (self.deadline - self.config.timeout_s)
            self.next_stall_log = time.monotonic() + diagnose.log_stall(self.dealer, self.run, quiet_s)
        if time.monotonic() > self.deadline:
            waiting = self._waiting_for()
            self.fail(f"{self.phase}: no progress for {self.config.timeout_s:.0f} s; waiting for {waiting}")

    def _waiting_for(self) -> str:
        """What the phase is waiting for (its deadline has passed), by name."""
        cfg = self.config
        if self.phase == "forming":
            return (f"servers {sorted(set(range(cfg.servers)) - set(self.servers))} and "
                    f"workers {sorted(set(range(cfg.workers)) - set(self.workers))} to register")
        if self.phase == "reforming":
            return "members to register again: " + ", ".join(
                f"{role} {i}" for role, i in sorted(self.reform.awaited)
                if self.members.members[(role, i)].alive
                and not self.members.members[(role, i)].confirmed)
        if self.phase == "finishing":
            return f"worker {self.finisher} to write the final parameters (FINISHED)"
        if self.phase == "stopping":
            return f"final heartbeats from servers {sorted(set(range(cfg.servers)) - self.stopped)}"
        return diagnose.stalled_step(self.dealer, self.run)

    def fail(self, why: str, linger_s: float = 0.0) -> None:
        """The run cannot go on: say why, write it into the summary, and exit non-zero;
        with ``linger_s``, in phase "failed" that long first, telling workers it is over."""
        self.failure = why
        log.error("%s", why)
        self.phase = "exit"
        if linger_s:
            self.phase, self.exit_at = "failed", time.monotonic() + linger_s

    def handle(self, frames: list) -> None:
        ident, rid = frames[0].bytes, 0
        try:
            header = request_header(frames)
            rid = header["rid"]
            check_frames(header["kind"], frames[2:])
            curve.check_sender(frames[1], header)
            if self._repeat(ident, rid) or self._held_while_reforming(header):
                return
            handler = {Kind.REGISTER: self.on_register, Kind.HEARTBEAT: self.on_heartbeat,
                       Kind.LEASE: self.on_lease, Kind.REPORT: self.on_report,
                       Kind.DONE: self.on_done, Kind.FINISHED: self.on_finished,
                       Kind.STATUS: self.on_status, Kind.NORM: self.on_norm,
                       Kind.JOB_ERROR: self.on_job_error}.get(header["kind"])
            if handler is None:
                raise ProtocolError(Error.UNKNOWN_KIND, f"the scheduler does not serve {header['kind']!r}")
            handler(ident, header)
        except ProtocolError as exc:
            if exc.code == Error.REREGISTER:      # not cached: the same request comes back
                return self._send(ident, encode(Kind.ERROR, rid, code=exc.code, reason=exc.reason))
            self.refusals.note(exc)
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

    def reply(self, ident, kind: str, rid: int, cache: bool = True, **fields) -> None:
        message = encode(kind, rid, **fields)
        if cache:                        # for _repeat
            self.answered[(ident, rid)] = message
            if len(self.answered) > REPLY_CACHE:
                self.answered.popitem(last=False)
        self._send(ident, message)

    def _send(self, ident: bytes, message: bytes) -> None:
        try:
            self.router.send_multipart([ident, message])
        except zmq.ZMQError as exc:
            log.warning("reply to a vanished peer dropped: %s", exc)

    # -- liveness -------------------------------------------------------------------
    def _check_liveness(self) -> None:
        phase = self.reform.resume_phase if self.phase == "reforming" else self.phase
        for member in self.members.overdue(time.monotonic()):
            if member.role == "worker":
                # Once DONE is answered the other workers leave; only the finisher is still
                # needed, and after FINISHED nobody is.
                if phase == "training" or (phase == "finishing" and member.index == self.finisher):
                    self._worker_died(member)
            elif phase in ("training", "finishing"):
                self.fail(f"server {member.index} silent for {self.config.dead_after_s:.1f} s; "
                          "the run cannot continue without it")
                return

    def _worker_died(self, member) -> None:
        """Deal its tasks again (``Failover.worker_died``) and let the run go on without it."""
        live = self.failover.worker_died(member, self.dealer, self.run, self.shard_stats)
        if not live and self.phase in ("training", "reforming"):
            self.fail("every worker is dead")
        elif self.phase == "finishing" and member.index == self.finisher:
            self.fail(f"worker {member.index} died while writing the final parameters")
        else:
            self._release_done()

    # -- training -------------------------------------------------------------------
    def on_lease(self, ident, header) -> None:
        """Lease the worker's next task: BSP from its step, SSP from its clock or older
        rounds, ASP from any dealt epoch. None: nothing left for this step/clock (ASP: the
        run). ``or_next``: else from the next step (an idle worker's; the task names it)."""
        ahead = optional_bool(header, "ahead", False)    # a busy worker's: Dealer.take_ahead
        or_next = optional_bool(header, "or_next", False)
        fuse = optional_int(header, "fuse", 1, 1, 1 << 16)   # tasks in one pass: Dealer.take_more
        self._check_training(header)
        worker, step = header["worker"], header["step"]
        if self.run.started():
            self.journal.started(self.run.t_start)
        pooled = self.config.mode == "asp" or self.config.diloco_async
        if pooled:
            task, victim = self._lease_asp(worker, ahead)
            rounds = sorted(self.dealer.deques)
        elif step == -1:                 # "anything dealt again?" from a worker done stepping
            rounds = sorted(self.dealer.deques)
            task, victim = self.dealer.take(worker, rounds, rounds)
        else:
            task, victim, rounds = self._lease_step(worker, step, ahead)
            if task is None and or_next and step + 1 < self.run.steps:
                task, victim, rounds = self._lease_step(worker, step + 1, ahead)
        if victim is not None:
            self.tracer.instant("steal", "steal", thief=worker, victim=victim, task=task.id,
                                tasks=self.dealer.steal_log[-1][3])
        if self.config.diloco_async:     # a round: as many inner steps as its speed allows
            fuse = self.dealer.local_steps(worker, self.config.inner_steps)
        fused = task and fuse > 1 and self.config.mode != "asp"    # ASP: a push per task
        more = (self.dealer.take_more(worker, task, fuse, ahead, any_step=self.config.diloco_async)
                if fused else [])
        self.reply(ident, Kind.OK, header["rid"], task=task.to_wire() if task else None,
                   more=[t.to_wire() for t in more],
                   step_tasks=self._step_tasks(task),
                   redo=bool(task and task.id in self.dealer.redo),
                   left=self.dealer.own_left(worker, rounds))

    def _step_tasks(self, task) -> int:
        """How many tasks the shards wait for before applying ``task``'s push: its step's,
        or in DiLoCo its round's (the task names its inner step)."""
        if task is None:
            return 0
        if self.config.diloco_async:     # SSP shards: a push is applied on its own
            return 1
        if self.config.mode == "diloco":
            return self.dealer.round_tasks(self.dealer.round_of(task.step))
        return self.dealer.plan.num_tasks(task.step)

    def _lease_step(self, worker: int, step: int, ahead: bool):
        """BSP: a task of ``step``, SSP: of clock ``step`` or older; (task, victim, rounds)."""
        if not 0 <= step < self.run.steps:
            raise ProtocolError(Error.BAD_FIELD, f"step {step} outside [-1, {self.run.steps})")
        self._deal(step)
        rounds = ([step] if self.config.mode in ("bsp", "diloco")
                  else sorted(r for r in self.dealer.deques if r <= step))
        task, victim = self.dealer.take(worker, rounds, rounds, ahead)
        self.failover.leased(worker, step)
        return task, victim, rounds

    def _lease_asp(self, worker: int, ahead: bool):
        """ASP deals a whole epoch at a time; the next only when the current is drained."""
        while True:
            rounds = sorted(self.dealer.deques)
            task, victim = self.dealer.take(worker, rounds, rounds, ahead)
            if task is not None or ahead or self.next_round >= self.dealer.rounds:
                return task, victim
            self._deal(self.next_round)
            self.next_round += 1

    def _deal(self, rnd: int) -> None:
        if rnd not in self.dealer.dealt:
            self.dealer.deal(rnd)
            self.journal.dealt(rnd, self.dealer.grain_of(rnd))   # before any lease is answered

    def on_report(self, ident, header) -> None:
        """A worker pushed some tasks' gradients; ``rejected`` lists those a shard refused
        as already applied."""
        self._check_training(header)
        ids = check_int_list(header, "tasks", 1 << 16)
        rejected = set(check_int_list(header, "rejected", 1 << 16))
        moved = registration.bytes_moved(header)
        if not self.dealer.knows(ids):
            raise ProtocolError(Error.BAD_FIELD, "tasks names an id no step dealt so far has")
        worker = header["worker"]
        if self.reform and self.reform.seen_report(header["inc"], header["rid"]):
            return self.reply(ident, Kind.OK, header["rid"])     # journaled before our restart
        self.journal.report(header)
        crash_at(self.config, "report", header["step"])
        self.dealer.complete(ids)
        self.run.count_tasks(self.dealer.plan, ids, rejected)   # leased or (after a restart) not
        compute_s, samples = float(header["compute_s"]), header["samples"]
        if compute_s > 0 and samples:
            self.dealer.note_speed(worker, samples / compute_s)
        self.run.report(worker, header["step"], len(ids), samples, float(header["loss_sum"]),
                        compute_s, float(header["wait_s"]))
        self.run.note_bytes(worker, header["inc"], *moved)
        self.deadline = time.monotonic() + self.config.timeout_s
        self.reply(ident, Kind.OK, header["rid"])
        self._release_done()            # the last task dealt again may just have come back

    def _check_training(self, header) -> None:
        if self.phase == "failed":
            raise ProtocolError(Error.RUN_OVER, f"the run failed: {self.failure}")
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
        bye = optional_bool(header, "bye", False)
        stats = (registration.server_stats(header["stats"], index, self.shard_map)
                 if "stats" in header else None)
        if role == "worker" and self.phase == "failed":    # the worker stops on hearing it
            raise ProtocolError(Error.RUN_OVER, f"the run failed: {self.failure}")
        net = registration.net_faults(header["net_faults"]) if "net_faults" in header else None
        self.members.seen(role, index, header["inc"], time.monotonic())
        if role == "worker":             # not cached: a resent heartbeat is handled again (seen)
            if net is not None:          # a live incarnation's counts (members.seen said so)
                self.worker_net_faults[(index, header["inc"])] = net
            if bye:                      # it heard its DONE answer and is gone: no reply
                self.worker_byes.add((index, header["inc"]))
                return self._leave_when_all_said_bye()
            self.reply(ident, Kind.OK, header["rid"], cache=False)
            return
        if stats is not None:
            self.shard_stats[index] = stats
            if self.config.checkpoint_every and self.run is not None:
                self.recovery.commit(self.shard_stats, self.run)
        if bye and self.phase == "stopping":   # it heard our stop and is gone
            self.byes.add(index)
            return self._leave_when_all_said_bye()
        stop = self.phase in ("stopping", "failed")   # failed: a job error ended the run
        self.reply(ident, Kind.OK, header["rid"], cache=False, stop=stop, fenced=self.members.fenced)
        if stop:
            self.stopped.add(index)
            if len(self.stopped) == self.config.servers and self.exit_at is None:
                # A stop reply can be lost like any message: linger a few heartbeats,
                # still answering "stop" to a server that did not hear it.
                self.exit_at = time.monotonic() + STOP_GRACE_S

    def on_norm(self, ident, header) -> None:
        """A shard's part of a BSP step's squared gradient norm (clipping: ps.scheduler.norms).
        Answered once every shard's part is in, with the step's global norm. A norm that is
        not finite follows the servers' ``--nonfinite``: skip the step, or fail the run."""
        index, step, sumsq = header["index"], header["step"], float(header["sumsq"])
        policy = header.get("nonfinite", "reject")
        if self.phase not in ("training", "finishing", "reforming") or self.run is None:
            raise ProtocolError(Error.NOT_READY, f"the cluster is {self.phase}")
        if not 0 <= index < self.config.servers:
            raise ProtocolError(Error.UNKNOWN_SENDER, f"unknown server {index}")
        if not 0 <= step < self.run.steps or sumsq < 0 or policy not in validation.NONFINITE_POLICIES:
            raise ProtocolError(Error.BAD_FIELD, f"a norm must name a step in [0, {self.run.steps}), "
                                                 "a sum of squares >= 0 and a --nonfinite policy")
        self.members.seen("server", index, header["inc"], time.monotonic())
        crash_at(self.config, "norm", step)   # fault hook: a step's norm left unanswered
        answer = self.norms.offer(step, index, sumsq, (ident, header["rid"]))
        if answer is None:
            return                          # the other shards' parts are still to come
        total = self.norms.total(step)
        if not math.isfinite(total) and policy == "reject":
            return self.fail(f"step {step}: the gradient's global norm is {total} (a sum of "
                             "finite pushes overflowed): the model has diverged")
        for who, rid in answer:
            self.reply(who, Kind.OK, rid, norm_step=step, total_norm=total,
                       skip=not math.isfinite(total))

    def on_status(self, ident, header) -> None:
        """How the run goes; asked about a ``step``, also who holds its unreported tasks."""
        self.reply(ident, Kind.OK, header["rid"], **summary.status(
            self.phase, self.shard_stats, self.run, self.dealer, header.get("step")))

    def close(self) -> None:
        self.journal.close()
        self.router.close(linger=0)
        curve.stop(self.auth)
        self.ctx.term()


def main(argv=None) -> int:
    config = parse_args(argv)
    messages.install_from_env("scheduler")
    if config.secure:
        curve.use(curve.Keyring(config.secure, "scheduler"))
    scheduler = Scheduler(config)
    faulthandler.register(signal.SIGUSR1)   # `kill -USR1 PID` prints every thread's stack
    try:
        return scheduler.serve()
    except KeyboardInterrupt:
        return 130
    finally:
        scheduler.close()
