"""The worker: lease tasks, pull parameters, compute gradients, push them.

One worker process holds the torch model on its device and no authoritative
state. Its loop, for each step (BSP) or clock (SSP)::

    task   = scheduler.lease(step)            # control path; the next one is leased ahead
    params = shards.pull(step)                # data path; the shard's gate may hold it
    while task:                               # own tasks first, then stolen ones
        grads += n * grad(mean loss of the task's batch)
        task = scheduler.lease(step)          # idle: or_next brings step + 1's first task
    shards.push(grads, task ids, sample count)   # BSP, CPU: per shard, in backward (overlap.py);
                                              # the pull of step + 1 is sent right behind it
    scheduler.report(step, task ids, loss, timings)

and in ASP, for each task: lease, pull, compute, push, report.

The gradient pushed is a **sum** over the task's samples; the shard divides by the
sample count (BSP: of the whole step; SSP/ASP: of this push), which is what makes
the cluster's BSP update equal single-process training on the global batch.

Failures: a heartbeat thread keeps this worker alive in the scheduler's eyes; if it
is declared dead anyway (paused too long), it is fenced and stops, as it does when
the scheduler stops answering or fails the run (``worker.heartbeat``); an exception
in the job's own code stops the run (``worker.job.JobError``). A task dealt
again after its holder died (``redo``) is pushed on its own, on the parameters of
its step. While a BSP pull waits for a step to complete, the worker asks every
second whether a task of that step was dealt again, since it may be the one the
step is waiting for.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import zmq

from ps.trace import Tracer
from ps.wire.client import Peer, RemoteError, ShardClient, ShardInfo
from ps.wire.protocol import WAIT_LOG_S, Error, Kind
from worker.config import WorkerConfig, pick_device
from worker.diloco import LocalSteps
from worker.flat import FlatModel
from worker.heartbeat import Heartbeat, as_fenced, lost_after
from worker.job import collate, load_job
from worker.leases import Leases
from worker.reports import Reports
from worker.speedups.overlap import Overlap
from worker.sparse import SparseClient, tables_of
from worker.speedups.prefetch import Prefetch
from worker.straggler import CrashAt, Slowdown
from worker.waits import describe_pull

log = logging.getLogger("worker")

POLL_S = 1.0            # a blocked pull or DONE wakes this often to look for re-dealt tasks
BYE_FLUSH_S = 0.2       # how long the last heartbeat (bye) may take to leave at exit
MAX_FUSE = 1 << 16      # --fuse 0: as many tasks per pass as a lease carries


def clip_push(grads: np.ndarray, samples: int, max_norm: float) -> float:
    """SSP/ASP clipping: each push by its own global norm (the worker holds all of it, so no
    agreement is needed, unlike BSP's step: ps.scheduler.norms). ``grads`` is the push's
    gradient SUM over ``samples``; its mean's norm decides, and scaling the sum scales the
    mean. torch's ``clip_grad_norm_`` arithmetic, in float32. Returns the coefficient."""
    norm = float(torch.linalg.vector_norm(torch.from_numpy(grads), dtype=torch.float64)) / samples
    coef = np.float32(max_norm) / (np.float32(norm) + np.float32(1e-6))
    if coef < 1:
        np.multiply(grads, coef, out=grads)
    return float(min(coef, 1.0))


@dataclass
class Group:
    """Tasks whose gradients are summed in the flat buffer and pushed together."""
    tasks: list = field(default_factory=list)
    loss_sum: float = 0.0
    samples: int = 0
    compute_s: float = 0.0
    step_tasks: int = 1          # tasks in the step (BSP: the shard waits for that many)
    replies: list | None = None  # the shards' replies, once pushed from backward hooks


class Worker:
    def __init__(self, config: WorkerConfig):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.job = load_job(config.job)
        self.device = pick_device(config.device)
        model, self.dataset = self.job.build(config.seed)
        self.model = model.to(self.device)
        self.flat = FlatModel(self.model, self.device, staged=config.staged_buffers or None)
        self.param_groups = self.job.param_groups(self.model)   # ranges of the flat vector
        self.ctx = zmq.Context()
        self.scheduler = Peer(self.ctx, config.scheduler, "scheduler")
        self.shards: ShardClient | None = None
        self.heartbeat: Heartbeat | None = None
        self.id, self.inc = config.worker_id, 0
        self.mode = "bsp"
        self.held = -1                       # the step whose parameters the model holds (BSP)
        self.slowdown = Slowdown(config.slow, config.jitter, config.seed)
        self.crash = CrashAt.parse(config.crash_at)
        self.tracer = Tracer(None, "worker", 0)
        self.leases: Leases | None = None
        self.overlap: Overlap | None = None
        self.last_report = time.perf_counter()
        self.reports: Reports | None = None
        self.prefetch: Prefetch | None = None   # the next step's pull, sent ahead
        self.local: LocalSteps | None = None    # --mode diloco: the inner loop
        self.diloco_async = False               # --mode diloco --async
        self.sparse: SparseClient | None = None  # the job's sparse tables (worker/sparse.py)

    def register(self) -> dict:
        job = self.job
        deadline = time.monotonic() + self.config.timeout_s
        while True:       # a replacement retries until the worker it replaces is declared dead
            try:
                reply, _ = self.scheduler.request(
                    Kind.REGISTER, self.config.timeout_s, role="worker", worker=self.id,
                    layout=self.flat.layout, dataset_size=len(self.dataset),
                    batch_size=job.batch_size, shuffle=job.shuffle, optimizer=job.optimizer,
                    epochs=job.epochs, seed=self.config.seed, param_groups=self.param_groups,
                    lr_at=job.lr_at is not None, clip=job.clip, outer_optimizer=job.outer_optimizer,
                    sparse=[t.spec() for t in tables_of(self.model)] or None)
                break
            except RemoteError as exc:
                if exc.code != Error.NOT_READY or time.monotonic() > deadline:
                    raise
                time.sleep(POLL_S / 4)
        self.id, self.inc, self.mode = reply["worker"], reply["inc"], reply["mode"]
        if self.config.trace and self.config.out:
            self.tracer = Tracer(self.config.out, f"worker{self.id}", 100 + self.inc,
                                 file=f"worker{self.id}-{self.inc}")   # a replacement: new file
        shards = [ShardInfo(s["index"], s["endpoint"], s["lo"], s["hi"]) for s in reply["shards"]]
        self.shards = ShardClient(self.ctx, shards, self.id, self.config.timeout_s, self.inc,
                                  self.config.grad_dtype, self.config.param_dtype)
        self.heartbeat = Heartbeat(self.ctx, self.config.scheduler, self.id, self.inc,
                                   lost_after_s=lost_after(reply.get("dead_after_s")))
        # After a scheduler restart, either socket may be the first to hear REREGISTER.
        self.scheduler.register_again = self.heartbeat.peer.register_again = self.register_again
        for peer in (self.scheduler, *self.shards.peers):   # no wait outlasts a reason to stop
            peer.check = self.heartbeat.check
        self.heartbeat.start()
        self.leases = Leases(self.scheduler, self.id, self.inc, self.config.timeout_s,
                             self.config.fuse or MAX_FUSE)   # the scheduler never fuses in ASP
        self.reports = Reports(self.scheduler, self.id, self.inc, self.config.timeout_s, self.shards)
        # DiLoCo's shards are BSP shards whose versions are rounds: pulls behave as in BSP;
        # async, SSP shards whose clocks are this worker's rounds.
        self.diloco_async = bool(reply.get("diloco_async"))
        shard_mode = ("ssp" if self.diloco_async else "bsp") if self.mode == "diloco" else self.mode
        self.prefetch = Prefetch(self.shards, self.config.prefetch, shard_mode, reply["steps"])
        self.local = (LocalSteps(self, reply["inner_steps"], self.diloco_async)
                      if self.mode == "diloco" else None)
        if tables_of(self.model):            # sparse rows pushed before the dense push
            self.sparse = SparseClient(self.shards, tables_of(self.model), self.config.timeout_s)
        if (self.config.overlap and self.mode == "bsp" and not self.flat.staged
                and self.sparse is None
                and not self.config.crash_at and not self.slowdown.active):   # why: worker/speedups/overlap.py
            self.overlap = Overlap(self.model, self.flat, self.shards, self.tracer)
        if reply.get("lr_versions"):   # every worker: a shard steps once any one has sent it
            self.shards.schedule(self.job.lr_table(reply["lr_versions"]))
        if self.id == 0 and reply["start_step"] == 0:   # worker 0's build_model() is the start
            self.shards.init(self.flat.params_np)
        log.info("worker %d (incarnation %d) on %s, steps %d..%d, %s", self.id, self.inc,
                 self.device, reply["start_step"], reply["steps"], reply["mode"])
        return reply

    def register_again(self) -> None:
        """The scheduler restarted: register again as the same worker and incarnation, on
        a socket of our own (the heartbeat thread may call this too). FENCED: we were
        declared dead meanwhile."""
        peer = Peer(self.ctx, self.config.scheduler, "scheduler")
        try:
            peer.request(Kind.REGISTER, self.config.timeout_s, role="worker", index=self.id,
                         inc=self.inc)
        finally:
            peer.close()
        log.warning("worker %d registered again with a restarted scheduler", self.id)

    # -- the pieces of a step -------------------------------------------------------
    def compute(self, tasks: list, step_tasks: int, group: Group, overlap: bool = False) -> None:
        """Add n * grad(mean loss) of tasks of one step into the flat gradient, in one pass
        over all their samples (a fused lease: ``Dealer.take_more``); with ``overlap``, if
        they are our last own tasks of the step, push the group from backward hooks."""
        ids, step = [t[0] for t in tasks], tasks[0][1]
        sample_ids = [i for t in tasks for i in t[2]]
        if self.sparse is not None:
            self.sparse.step = step              # its tables' rows: those of this step
        with self.tracer.span("task", "task", task=ids[0], tasks=ids, step=step):
            t0 = time.perf_counter()
            with self.job.running("dataset"):
                batch = collate(self.dataset, sample_ids, self.device)
            loss = self.job.loss(self.model, batch)
            self.flat.check_grads_in_place()  # before backward: no hook may push a stray .grad
            n = len(sample_ids)
            armed = overlap and self.overlap is not None and self.leases.last_own(step)
            if armed:
                self.overlap.arm(step, [t[0] for t in group.tasks] + ids, group.samples + n,
                                 step_tasks)
            with self.tracer.span("backward", "task", task=ids[0], tasks=ids, overlap=armed), \
                    self.job.running("loss_fn"):     # the job's loss and model, backwards
                (loss * n).backward()        # gradient of the tasks' loss SUM, accumulated
            group.loss_sum += float(loss.detach()) * n
            took = time.perf_counter() - t0
            for t in tasks:                  # each task slowed (or not) by its own share
                self.slowdown.after(t[0], took * len(t[2]) / n)
            group.compute_s += time.perf_counter() - t0
        group.tasks += tasks
        group.samples += n
        group.step_tasks = step_tasks
        if armed:
            then = self.prefetch.behind(step)
            group.replies = self.overlap.finish(then_pull=then)
            self.prefetch.sent_behind(then)

    def pull(self, step: int, redo_step: int | None = None) -> None:
        """Read the parameters for ``step``, however long the gate takes (up to the
        deadline); while it is closed, look for re-dealt tasks of ``redo_step``."""
        deadline = time.monotonic() + self.config.timeout_s
        log_at, waiting = time.monotonic() + WAIT_LOG_S, ""
        pending = self.prefetch.take(step)
        with self.tracer.span("pull", "wait", step=step, prefetched=pending is not None):
            while True:
                self.check_heartbeat()
                pending = pending or self.shards.pull_send(step)
                try:
                    self.shards.pull_into(self.flat.params_np, step, timeout_s=POLL_S,
                                          pending=pending, keep_on_timeout=True)
                    break
                except (TimeoutError, RemoteError) as exc:
                    # A pull the server parked past its --timeout-s is answered TIMEOUT
                    # (possible for one sent ahead, behind a push): ask again, like ours.
                    # Our own wait running out is not the pull's: it stays asked (Lazy
                    # Pirate resends it if lost), so a reply on a slow link is not asked
                    # for twice.
                    if isinstance(exc, RemoteError) and exc.code != Error.TIMEOUT:
                        raise
                    if isinstance(exc, RemoteError):
                        pending = None                 # answered TIMEOUT: ask again, fresh
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"worker {self.id}: step {step} still unreadable after "
                                           f"{self.config.timeout_s:.0f} s; {waiting}") from None
                    if time.monotonic() > log_at:     # no silent waits: name what is missing
                        waiting = describe_pull(self.shards, self.scheduler, step, self.mode)
                        log.warning("%s", waiting)
                        log_at = time.monotonic() + 5 * WAIT_LOG_S
                    if redo_step is not None and redo_step >= 0:
                        self.redo_waiting(redo_step)
        self.flat.after_pull()
        self.held = step

    def push(self, step: int, group: Group, ends_clock: bool = True,
             report_step: int | None = None, last: bool = False) -> None:
        """Push a group's gradient sum (an empty group: an SSP clock tick), then report it
        (as of ``report_step``, if not ``step``: async DiLoCo pushes its own clock and
        reports the round its tasks are of). A group already pushed from backward hooks
        (``replies``) is only reported. ``last``: see ``ShardClient.push``."""
        ids = [t[0] for t in group.tasks]
        replies = group.replies if group.replies is not None else \
            self.send_push(step, group, ids, ends_clock, last)
        # Rejected: no shard took it (all had it already). A push some shards refused and
        # others took is the second half of a dead worker's partial push: applied now.
        rejected = ids if not any(r.get("applied", True) for r in replies) else []
        now = time.perf_counter()
        self.reports.send(step if report_step is None else report_step, ids, rejected,
                          group.loss_sum, group.samples, group.compute_s,
                          max(0.0, now - self.last_report - group.compute_s))
        self.last_report = now

    def send_push(self, step: int, group: Group, ids: list[int], ends_clock: bool,
                  last: bool = False) -> list:
        self.flat.grads_to_host()
        if self.job.clip is not None and self.mode in ("ssp", "asp") and group.samples:
            clip_push(self.flat.grads_np, group.samples, self.job.clip)
        self.crash.maybe("before_push", step)
        if self.sparse is not None:              # acknowledged before the dense push: see
            self.sparse.push(step, ids, group.samples, group.step_tasks)   # ps/server/sparse_tables.py
            self.crash.maybe("after_sparse_push", step)
        if self.crash.at("mid_push", step):     # shard 0 takes the push, then we die
            self.shards.push(self.flat.grads_np, step, ids, group.samples, group.step_tasks,
                             ends_clock, only=[0])
            self.crash.now()
        then = self.prefetch.behind(step, ends_clock)
        with self.tracer.span("push", "wait", step=step, tasks=len(ids)):
            replies = self.shards.push(self.flat.grads_np, step, ids, group.samples,
                                       group.step_tasks, ends_clock, then_pull=then, last=last)
        self.prefetch.sent_behind(then)
        self.crash.maybe("after_push", step)
        return replies

    def run_alone(self, task: list, step_tasks: int) -> None:
        """A task dealt again (its holder died, or stolen while we wait): computed on
        the parameters of its own step (BSP) and pushed alone, so a shard that already
        has it can refuse just this task."""
        step = task[1]
        if self.mode == "bsp" and self.held != step:
            try:
                self.pull(step)
            except RemoteError as exc:
                if exc.code != Error.GONE:
                    raise
                # Every shard is past this step, so the task was applied by its first
                # holder before it died: report it done, push nothing.
                self.push_nothing(task)
                return
        self.flat.zero_grad()
        group = Group()
        try:
            self.compute([task], step_tasks, group)
        except RemoteError as exc:
            if exc.code != Error.GONE:
                raise
            # A sparse table is two steps past this one (pulled inside the forward): the
            # task was applied by its first holder; report it done, push nothing.
            self.push_nothing(task)
            return
        self.push(step, group, ends_clock=False)

    def push_nothing(self, task: list) -> None:
        self.reports.send(task[1], [task[0]], [], 0.0, 0, 0.0, 0.0)

    def redo_waiting(self, step: int) -> None:
        """While blocked: take every task still leasable for ``step`` (-1: any) and do it."""
        if self.mode == "diloco":            # a dead worker's part of a round: its trajectory
            return self.local.redo(step)
        while True:
            reply, _ = self.request(Kind.LEASE, step=step)
            if reply["task"] is None:
                return
            self.run_alone(reply["task"], reply["step_tasks"])

    # -- the loops ------------------------------------------------------------------
    def train_step(self, step: int) -> None:
        """BSP step or SSP clock: pull once, compute every task leased for it, push one sum.

        In SSP the clock advances when this worker's deque for it is empty, whether
        its tasks were done here or stolen; a clock with no task is pushed as a tick.
        """
        tasks, step_tasks, redo = self.leases.next(step)
        if tasks is None and self.mode == "bsp":
            return
        # SSP pulls even for an empty clock: the gate is what keeps this worker within
        # s clocks of the slowest; ticking through empty clocks unread would escape it.
        self.pull(step, redo_step=step - 1 if self.mode == "bsp" else None)
        self.prefetch.send(step + 1, "compute")   # SSP: the next clock's pull, while this computes
        self.flat.zero_grad()
        group = Group()
        while tasks is not None:
            if redo:
                if group.tasks:
                    self.push(step, group, ends_clock=False)
                    group = Group()
                self.run_alone(tasks[0], step_tasks)
                if self.mode == "bsp" and self.held != step:
                    self.pull(step)
                self.flat.zero_grad()
            else:
                self.compute(tasks, step_tasks, group, overlap=True)
                if group.replies is not None:   # pushed from backward hooks: reported before
                    self.push(step, group)      # the next lease, whose or_next may deal step
                    group = Group()             # + 1 (by speeds, ours included); a task
                    self.flat.zero_grad()       # stolen now goes in a second push
            tasks, step_tasks, redo = self.leases.next(step, or_next=True)   # idle now
        if group.tasks or self.mode == "ssp":
            self.push(step, group)

    def train_asp(self) -> None:
        """ASP: each task is pulled, computed and pushed on its own, as fast as it goes."""
        while True:
            tasks, step_tasks, _ = self.leases.next(-1)     # one task a lease in ASP
            if tasks is None:
                return
            step = tasks[0][1]
            self.pull(step)
            self.prefetch.send(step, "compute")   # the next task's parameters, while this computes
            self.flat.zero_grad()
            group = Group()
            self.compute(tasks, step_tasks, group)
            self.push(step, group)

    def train(self, start_step: int, steps: int) -> None:
        if self.mode == "asp":
            self.train_asp()
        elif self.mode == "diloco" and self.diloco_async:   # worker/diloco.py
            self.local.run_async()
        elif self.mode == "diloco":          # steps are rounds: worker/diloco.py
            for rnd in range(start_step, steps):
                self.local.round(rnd)
        else:
            for step in range(start_step, steps):
                self.train_step(step)
        self.prefetch.drop()

    def wait_for_all(self) -> bool:
        """DONE is answered once every live worker is done; until then, do any task dealt
        again. Returns whether this worker writes the final parameters."""
        self.reports.collect()               # DONE must not overtake a lost report
        rid = self.scheduler.send(Kind.DONE, worker=self.id, inc=self.inc)
        deadline = time.monotonic() + 10 * self.config.timeout_s
        while True:
            self.check_heartbeat()
            try:
                reply, _ = self.scheduler.recv(rid, POLL_S, "done")
                return bool(reply.get("finisher"))
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                self.redo_waiting(-1)
                # A report of a task done here may be lost, and nothing else would send it
                # again: the scheduler would wait for that task, and we for it, forever.
                self.reports.collect()
            except RemoteError as exc:
                raise as_fenced(exc)

    def finish(self, steps: int) -> None:
        """Pull the final parameters, save them, run the job's finish()."""
        self.pull(steps)
        if self.sparse is not None:
            self.sparse.step = steps
        if self.config.out:
            os.makedirs(self.config.out, exist_ok=True)
            tmp = os.path.join(self.config.out, "params.tmp.npz")
            np.savez(tmp, **self.flat.named_arrays())
            os.replace(tmp, os.path.join(self.config.out, "params.npz"))
        if self.job.finish is not None:
            self.model.eval()
            with torch.no_grad(), self.job.running("finish"):
                self.job.finish(self.model)
        self.request(Kind.FINISHED, **self.reports.bytes())     # the final pull's bytes too

    def request(self, kind: str, **fields) -> tuple[dict, list]:
        """A request to the scheduler on our own behalf (FENCED becomes ``Fenced``)."""
        try:
            return self.scheduler.request(kind, self.config.timeout_s, worker=self.id,
                                          inc=self.inc, **fields)
        except RemoteError as exc:
            raise as_fenced(exc)

    def check_heartbeat(self) -> None:
        """Stop if the heartbeat learnt we must: fenced, the run failed, the scheduler lost."""
        if self.heartbeat is not None:
            self.heartbeat.check()

    def run(self) -> None:
        reply = self.register()
        self.train(reply["start_step"], reply["steps"])
        with self.tracer.span("wait for others", "wait"):
            finisher = self.wait_for_all()
        if finisher:
            self.finish(reply["steps"])
        self.tracer.write()
        self.say_bye()

    def say_bye(self) -> None:
        """Tell the scheduler this worker heard its DONE answer (and, as the finisher, its
        FINISHED one) and is leaving, so it need not linger for a resent DONE; given
        BYE_FLUSH_S to leave before the socket closes. Lost, it costs the scheduler its
        linger (DONE_GRACE_S), nothing else."""
        self.scheduler.send(Kind.HEARTBEAT, want_reply=False, role="worker", index=self.id,
                            inc=self.inc, bye=True)
        self.scheduler.sock.close(linger=int(BYE_FLUSH_S * 1000))

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.shards:
            self.shards.close()
        self.scheduler.close()
        self.ctx.term()
