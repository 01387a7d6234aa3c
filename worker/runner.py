"""The worker: lease tasks, pull parameters, compute gradients, push them.

One worker process holds the torch model on its device and no authoritative
state. Its loop, for each step (BSP), clock (SSP) or task (ASP)::

    tasks  = scheduler.lease(step)            # control path
    params = shards.pull(step)                # data path; the shard's gate may hold it
    grads  = sum over tasks of n * grad(mean loss of the task's batch)
    shards.push(grads, task ids, sample count)
    scheduler.report(step, loss, timings)

The gradient pushed is a **sum** over the task's samples; the shard divides by the
sample count (BSP: of the whole step; SSP/ASP: of this push), which is what makes
the cluster's BSP update equal single-process training on the global batch.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import zmq

from ps.client import Peer, ShardClient, ShardInfo
from ps.protocol import Kind

from ps.trace import Tracer

from .flat import FlatModel
from .job import collate, load_job
from .leases import Leases
from .straggler import Slowdown

log = logging.getLogger("worker")


@dataclass
class WorkerConfig:
    scheduler: str                  # the scheduler's endpoint
    job: str                        # path of the job file
    worker_id: int = -1             # -1: the scheduler assigns one
    device: str = "auto"            # auto | cpu | cuda
    seed: int = 0                   # must equal the scheduler's
    out: str | None = None          # worker 0 writes params.npz here
    threads: int = 0                # torch intra-op threads (0: torch's default)
    timeout_s: float = 120.0        # deadline of every request
    slow: float = 1.0               # straggler emulation: every task this many times slower
    jitter: tuple = (0.0, 1.0)      # (P, F): any task F times slower with probability P
    trace: bool = False             # write trace/worker<id>.json into out


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    return torch.device(name)


class Worker:
    def __init__(self, config: WorkerConfig):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.job = load_job(config.job)
        self.device = pick_device(config.device)
        model, self.dataset = self.job.build(config.seed)
        self.model = model.to(self.device)
        self.flat = FlatModel(self.model, self.device)
        self.ctx = zmq.Context()
        self.scheduler = Peer(self.ctx, config.scheduler, "scheduler")
        self.shards: ShardClient | None = None
        self.id = config.worker_id
        self.slowdown = Slowdown(config.slow, config.jitter, config.seed)
        self.tracer = Tracer(None, "worker", 0)
        self.leases: Leases | None = None

    def register(self) -> dict:
        job = self.job
        reply, _ = self.scheduler.request(
            Kind.REGISTER, self.config.timeout_s, role="worker", worker=self.id,
            layout=self.flat.layout, dataset_size=len(self.dataset), batch_size=job.batch_size,
            shuffle=job.shuffle, optimizer=job.optimizer, epochs=job.epochs, seed=self.config.seed)
        self.id = reply["worker"]
        if self.config.trace and self.config.out:
            self.tracer = Tracer(self.config.out, f"worker{self.id}", 100 + self.id)
        shards = [ShardInfo(s["index"], s["endpoint"], s["lo"], s["hi"]) for s in reply["shards"]]
        self.shards = ShardClient(self.ctx, shards, self.id, self.config.timeout_s)
        if self.id == 0:                     # worker 0's build_model() is the starting point
            self.shards.init(self.flat.params_np)
        log.info("worker %d on %s, %d steps, %s", self.id, self.device, reply["steps"], reply["mode"])
        return reply

    # -- one unit of work -----------------------------------------------------------
    def compute(self, task: list) -> tuple[float, int]:
        """Add n * grad(mean loss) of one task into the flat gradient; (loss sum, n)."""
        task_id, _, sample_ids = task
        with self.tracer.span("task", "task", task=task_id, step=task[1]):
            t0 = time.perf_counter()
            batch = collate(self.dataset, sample_ids, self.device)
            loss = self.job.loss(self.model, batch)
            n = len(sample_ids)
            (loss * n).backward()            # gradient of the task's loss SUM, accumulated
            loss_sum = float(loss.detach()) * n
            self.slowdown.after(task_id, time.perf_counter() - t0)
        return loss_sum, n

    def pull(self, step: int) -> None:
        with self.tracer.span("pull", "wait", step=step):
            self.shards.pull_into(self.flat.params_np, step)
            self.flat.after_pull()

    def push(self, step: int, tasks: list, samples: int, step_tasks: int) -> list[int]:
        """Push the gradient sum of ``tasks``; return the ids any shard refused as duplicates."""
        self.flat.grads_to_host()
        ids = [t[0] for t in tasks]
        with self.tracer.span("push", "wait", step=step, tasks=len(ids)):
            replies = self.shards.push(self.flat.grads_np, step, ids, samples, max(step_tasks, 1))
        return ids if not all(r.get("applied", True) for r in replies) else []

    def train_step(self, mode: str, step: int) -> None:
        """BSP step or SSP clock: pull once, compute every task leased for it, push one sum.

        In SSP the clock advances when this worker's deque for it is empty, whether
        its tasks were done here or stolen; a clock with no task is pushed as a tick.
        """
        t0 = time.perf_counter()
        task, step_tasks = self.leases.next(step)
        done, loss_sum, samples, compute_s = [], 0.0, 0, 0.0
        if task is not None:
            self.pull(step)
            self.flat.zero_grad()
        while task is not None:
            t1 = time.perf_counter()
            task_loss, n = self.compute(task)
            compute_s += time.perf_counter() - t1
            done.append(task)
            loss_sum, samples = loss_sum + task_loss, samples + n
            task, next_step_tasks = self.leases.next(step)
            step_tasks = next_step_tasks or step_tasks
        rejected = []
        if done or mode == "ssp":
            rejected = self.push(step, done, samples, step_tasks)
        self.report(step, done, rejected, loss_sum, samples, compute_s,
                    time.perf_counter() - t0 - compute_s)

    def train_asp(self) -> None:
        """ASP: each task is pulled, computed and pushed on its own, as fast as it goes."""
        while True:
            t0 = time.perf_counter()
            task, step_tasks = self.leases.next(-1)
            if task is None:
                return
            step = task[1]
            self.pull(step)
            self.flat.zero_grad()
            t1 = time.perf_counter()
            loss_sum, n = self.compute(task)
            compute_s = time.perf_counter() - t1
            rejected = self.push(step, [task], n, step_tasks)
            self.report(step, [task], rejected, loss_sum, n, compute_s,
                        time.perf_counter() - t0 - compute_s)

    def report(self, step, tasks, rejected, loss_sum, samples, compute_s, wait_s) -> None:
        """Tell the scheduler what was pushed. Fire and forget: nothing waits on the
        answer, and the connection keeps it ahead of our next LEASE and DONE."""
        self.scheduler.send(Kind.REPORT, want_reply=False, worker=self.id, step=step,
                            tasks=[t[0] for t in tasks], rejected=rejected, loss_sum=loss_sum,
                            samples=samples, compute_s=compute_s, wait_s=wait_s)

    def train(self, mode: str, steps: int) -> None:
        self.leases = Leases(self.scheduler, self.id, self.config.timeout_s)
        if mode == "asp":
            self.train_asp()
        else:
            for step in range(steps):
                self.train_step(mode, step)

    def wait_for_all(self) -> None:
        """DONE is answered once every worker is done; keep checking the scheduler lives."""
        rid = self.scheduler.send(Kind.DONE, worker=self.id)
        deadline = time.monotonic() + 10 * self.config.timeout_s
        while True:
            try:
                self.scheduler.recv(rid, min(5.0, self.config.timeout_s), "done")
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                self.scheduler.request(Kind.STATUS, self.config.timeout_s)   # alive?

    def finish(self, steps: int) -> None:
        """Worker 0: pull the final parameters, save them, run the job's finish()."""
        self.shards.pull_into(self.flat.params_np, steps)
        self.flat.after_pull()
        if self.config.out:
            os.makedirs(self.config.out, exist_ok=True)
            tmp = os.path.join(self.config.out, "params.tmp.npz")
            np.savez(tmp, **self.flat.named_arrays())
            os.replace(tmp, os.path.join(self.config.out, "params.npz"))
        if self.job.finish is not None:
            self.model.eval()
            with torch.no_grad():
                self.job.finish(self.model)
        self.scheduler.request(Kind.FINISHED, self.config.timeout_s, worker=self.id)

    def run(self) -> None:
        reply = self.register()
        self.train(reply["mode"], reply["steps"])
        with self.tracer.span("wait for others", "wait"):
            self.wait_for_all()
        if self.id == 0:
            self.finish(reply["steps"])
        self.tracer.write()

    def close(self) -> None:
        if self.shards:
            self.shards.close()
        self.scheduler.close()
        self.ctx.term()
