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

from .flat import FlatModel
from .job import collate, load_job

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

    def register(self) -> dict:
        job = self.job
        reply, _ = self.scheduler.request(
            Kind.REGISTER, self.config.timeout_s, role="worker", worker=self.id,
            layout=self.flat.layout, dataset_size=len(self.dataset), batch_size=job.batch_size,
            shuffle=job.shuffle, optimizer=job.optimizer, epochs=job.epochs, seed=self.config.seed)
        self.id = reply["worker"]
        shards = [ShardInfo(s["index"], s["endpoint"], s["lo"], s["hi"]) for s in reply["shards"]]
        self.shards = ShardClient(self.ctx, shards, self.id, self.config.timeout_s)
        if self.id == 0:                     # worker 0's build_model() is the starting point
            self.shards.init(self.flat.params_np)
        log.info("worker %d on %s, %d steps, %s", self.id, self.device, reply["steps"], reply["mode"])
        return reply

    # -- one unit of work -----------------------------------------------------------
    def compute(self, tasks: list) -> tuple[float, int]:
        """Sum of n * grad(mean loss) over the tasks into the flat gradient buffer."""
        self.flat.zero_grad()
        loss_sum, samples = 0.0, 0
        for _, sample_ids in tasks:
            batch = collate(self.dataset, sample_ids, self.device)
            loss = self.job.loss(self.model, batch)
            n = len(sample_ids)
            (loss * n).backward()            # gradient of the task's loss SUM
            loss_sum += float(loss.detach()) * n
            samples += n
        self.flat.grads_to_host()
        return loss_sum, samples

    def train(self, mode: str, steps: int) -> None:
        c = self.config
        for step in range(steps):
            t0 = time.perf_counter()
            lease, _ = self.scheduler.request(Kind.LEASE, c.timeout_s, worker=self.id, step=step)
            tasks, step_tasks = lease["tasks"], lease["step_tasks"]
            compute_s, loss_sum, samples = 0.0, 0.0, 0
            # ASP pushes each task on its own; BSP and SSP push one sum per step/clock.
            groups = [[t] for t in tasks] if mode == "asp" else [tasks]
            for group in groups:
                if not group and mode == "bsp":
                    break                    # nothing to add to this step; skip its pull
                if group:
                    self.shards.pull_into(self.flat.params_np, step)
                    self.flat.after_pull()
                    t1 = time.perf_counter()
                    group_loss, group_samples = self.compute(group)
                    compute_s += time.perf_counter() - t1
                    loss_sum += group_loss
                    samples += group_samples
                    grad_samples = group_samples
                else:                        # SSP with no task this clock: a clock tick only
                    grad_samples = 0
                self.shards.push(self.flat.grads_np, step, [t[0] for t in group], grad_samples,
                                 step_tasks)
            wait_s = time.perf_counter() - t0 - compute_s
            self.scheduler.request(Kind.REPORT, c.timeout_s, worker=self.id, step=step,
                                   tasks=[t[0] for t in tasks], loss_sum=loss_sum, samples=samples,
                                   compute_s=compute_s, wait_s=wait_s)

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
        self.wait_for_all()
        if self.id == 0:
            self.finish(reply["steps"])

    def close(self) -> None:
        if self.shards:
            self.shards.close()
        self.scheduler.close()
        self.ctx.term()
