"""DiLoCo on a worker: H local optimizer steps a round, then one pseudo-gradient push.

``--mode diloco --inner-steps H`` (synchronous; Douillard et al. 2023). Round ``r``:

    pull θ_r                                   the shards' version r, the same for everyone
    for each step s of the round (rH .. rH+H-1, the last round may be shorter):
        the mean loss of this worker's part of global batch s, backward,
        clip_grad_norm_ (CLIP_GRAD_NORM), every group's lr from lr_at(s), an inner step
    push n_k (θ_r - θ_k)                       its pseudo-gradient, times its samples

The shards, BSP shards whose versions are rounds, sum the pushes, divide by the round's
samples (the sample-weighted mean pseudo-gradient) and take one step of the *outer*
optimizer (the job's OUTER_OPTIMIZER, Nesterov SGD by default): θ_{r+1}. The inner
optimizer (the job's OPTIMIZER with its param_groups) is torch's, here, and keeps its state
across rounds. Each worker moves its parameters twice a round instead of twice a step:
H times fewer bytes.

The parts are the scheduler's tasks: part j of every step of round r is dealt to worker j
(``ps.core.dealer``, ``by_part``). Tasks of a dead worker's round dealt again (``redo``)
are its own trajectory: from θ_r, with a fresh inner optimizer, pushed on their own.
``worker.reference.train_diloco`` is the single-process simulation a run must equal.

``--async`` (Liu et al. 2024, "Asynchronous Local-SGD"): no round waits for the others.
A worker's c-th round (its clock c) leases its inner steps from a pool of the run's
parts (as ASP leases tasks; stealing moves them), pulls θ through SSP's gate (no worker
more than ``--staleness`` rounds behind), trains one inner step per part and pushes its
pseudo-gradient, which the shards apply on arrival as 1/M of a round, with SGD momentum
applied once every M pushes (``ps.core.optim.DelayedSGD``). How many inner steps a round
has is the scheduler's choice: H scaled by the worker's measured speed (Dynamic Local
Updates, ``Dealer.local_steps``), so a slow worker's rounds take as long as the others'.
A worker with no round left says so (``last``): its clock gates nobody from then on.
"""
from __future__ import annotations

import time

import torch

from ps.wire.client import RemoteError
from ps.wire.protocol import Error, Kind
from worker import reference
from worker.job import collate


class LocalSteps:
    """A worker's inner loop (``worker.runner.Worker`` calls ``round`` for each round)."""

    def __init__(self, worker, inner_steps: int, asynchronous: bool = False):
        self.w = worker
        self.groups = reference.groups_of(worker.job, worker.model)
        self.own_lr = [g.get("lr") for g in self.groups]    # before torch fills in defaults
        self.opt = reference.torch_optimizer(self.groups, worker.job.optimizer)
        self.start = torch.empty_like(worker.flat.params)   # (n,) θ_r, where params live
        self.inner_steps = inner_steps                        # H: a task's round is step // H
        self.asynchronous = asynchronous
        self.clock = 0                                        # async: rounds pushed so far
        self.ended = False                                    # async: ``last`` pushed

    # -- async ------------------------------------------------------------------------
    def run_async(self) -> None:
        """Round after round, each as long as the scheduler leases (its inner steps), until
        the pool is empty; then tell the shards this worker's clock gates nobody."""
        while self._round_async():
            pass
        self.ended = True
        self.w.shards.push(self.w.flat.grads_np, self.clock, [], 0, 1, last=True)

    def _round_async(self) -> bool:
        """One async round: lease its inner steps, pull through the gate, train, push."""
        reply, _ = self.w.request(Kind.LEASE, step=-1, ahead=False, or_next=False, fuse=1)
        if reply["task"] is None:
            return False
        tasks = [reply["task"], *reply.get("more", [])]
        self.w.pull(self.clock)
        self._trajectory(self.clock, tasks, 1, self.opt, one_per_task=True)
        self.clock += 1
        return True

    def round(self, rnd: int) -> None:
        """Train round ``rnd``: lease this worker's parts, pull θ_r (while the previous
        round cannot complete, doing any of its parts dealt again), step, push Δ."""
        own, redo, counts = self._lease(rnd)
        if not (own or redo):
            return                           # nothing of ours: the next round's pull reads θ
        self.w.pull(rnd, redo_step=rnd - 1)
        if own:
            self._trajectory(rnd, own, counts[rnd], self.opt)
        if redo:
            self._again(rnd, redo, counts[rnd])

    def redo(self, rnd: int) -> None:
        """While blocked on round ``rnd + 1``'s parameters, or (``rnd`` -1) waiting for
        DONE: parts of round ``rnd`` (-1: of any round) dealt again (their worker died)."""
        if rnd < -1:
            return
        if self.asynchronous:                # tasks of a dead worker: rounds of our own
            while self.ended and self._round_async():
                pass
            return
        own, redo, counts = self._lease(rnd)
        for r in sorted(counts):
            self._again(r, [t for t in own + redo if t[1] // self.inner_steps == r], counts[r])

    def _again(self, rnd: int, tasks: list, step_tasks: int) -> None:
        """A dead worker's part of round ``rnd``: its own trajectory, from θ_r with a fresh
        inner optimizer (its optimizer's state died with it), pushed on its own."""
        try:
            self.w.pull(rnd)
        except RemoteError as exc:
            if exc.code != Error.GONE:
                raise
            for task in tasks:               # every shard is past the round: it was applied
                self.w.push_nothing(task)
            return
        fresh = reference.torch_optimizer(reference.groups_of(self.w.job, self.w.model),
                                          self.w.job.optimizer)
        self._trajectory(rnd, tasks, step_tasks, fresh)

    def _lease(self, rnd: int) -> tuple[list, list, dict]:
        """Every task of ours in round ``rnd`` (-1: any round; fused leases carry several),
        those dealt again from a dead worker apart, and each round's count of tasks (what
        its push tells the shards to wait for)."""
        own, redo, counts = [], [], {}
        tasks, n, again = self.w.leases.next(rnd)
        while tasks is not None:
            (redo if again else own).extend(tasks)
            counts[tasks[0][1] // self.inner_steps] = n
            tasks, n, again = self.w.leases.next(rnd)
        return own, redo, counts

    def _trajectory(self, rnd: int, tasks: list, step_tasks: int, opt,
                    one_per_task: bool = False) -> None:
        """From θ_r (in the model now): one inner step per global step of the tasks (async:
        per task), then push the pseudo-gradient."""
        from worker.runner import Group      # here: worker.runner imports this module
        w, job = self.w, self.w.job
        self.start.copy_(w.flat.params)
        group = Group(step_tasks=step_tasks)
        params = [p for g in opt.param_groups for p in g["params"]]
        batches = ([[t] for t in sorted(tasks, key=lambda t: (t[1], t[0]))] if one_per_task else
                   [[t for t in tasks if t[1] == s] for s in sorted({t[1] for t in tasks})])
        for batch_tasks in batches:                          # parts of one step: one batch
            step, t0 = batch_tasks[0][1], time.perf_counter()
            samples = [i for t in batch_tasks for i in t[2]]
            w.flat.zero_grad()
            with job.running("dataset"):
                batch = collate(w.dataset, samples, w.device)
            loss = job.loss(w.model, batch)
            with job.running("loss_fn"):
                loss.backward()
            if job.clip is not None:
                torch.nn.utils.clip_grad_norm_(params, job.clip)
            reference.set_lr(opt, job, step, self.own_lr)
            opt.step()
            group.loss_sum += float(loss.detach()) * len(samples)
            group.samples += len(samples)
            took = time.perf_counter() - t0
            w.slowdown.after(batch_tasks[0][0], took)        # --slow: a straggler's factor
            group.compute_s += time.perf_counter() - t0      # the scheduler's speed measure
        group.tasks = tasks
        # Δ = θ_r - θ_k into the flat gradient buffer, times the samples: the shards sum
        # the pushes and divide by the round's samples, a sample-weighted mean (async:
        # each push its own samples' mean, over M).
        torch.sub(self.start, w.flat.params, out=w.flat.grads)
        w.flat.grads.mul_(group.samples)
        if self.asynchronous:                # reported as of the (nominal) round of its steps
            w.push(rnd, group, report_step=max(t[1] for t in tasks) // self.inner_steps,
                   last=self.ended)
        else:
            w.push(rnd, group)
