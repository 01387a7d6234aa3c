"""The single-process reference: the torch loop a BSP run on the cluster must equal.

A job trained here, in one process, on the cluster's global batches (``ps.core.tasks``)
with the job's whole recipe, is the oracle of the tests and the baseline of the figures:

    for step in range(steps):
        grads = sum over the step's parts of n_k * grad(mean loss of part k)) / n
        clip_grad_norm_(params, CLIP_GRAD_NORM)          # if the job clips
        every group's lr = lr_at(step), or its own lr * lr_at(step) / OPTIMIZER["lr"]
        torch.optim step, with the job's param_groups

``parts`` cuts each global batch into the same contiguous micro-batches as a run's tasks
(one per task), summing ``n_k * grad`` as the workers do: a gradient that is zero in
exact arithmetic (an attention key's bias) is then the same rounding noise on both sides,
where the whole batch at once would round differently. The forward pass runs under the
job's ``AUTOCAST`` (``Job.loss``), as on the workers.

    python -m worker.reference --job examples/gpt.py --steps 300 --out ref/
    # ref/summary.json: {"losses": [...], "wall_s": ..., ...}; ref/params.npz
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from ps.core.tasks import TaskPlan, steps_per_epoch
from worker.job import Job, collate, load_job

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def torch_optimizer(params, config: dict) -> torch.optim.Optimizer:
    """torch.optim's optimizer for a job's OPTIMIZER (torch's argument names)."""
    kwargs = {k: v for k, v in config.items() if k != "name"}
    return OPTIMIZERS[config["name"].lower()](params, **kwargs)


def groups_of(job: Job, model: torch.nn.Module) -> list[dict]:
    """torch's param groups for the job: its ``param_groups`` with tensors for names."""
    if not hasattr(job.module, "param_groups"):
        return [{"params": list(model.parameters())}]
    named = dict(model.named_parameters())
    return [{**g, "params": [named[n] for n in g["params"]]} for g in job.module.param_groups(model)]


def set_lr(opt: torch.optim.Optimizer, job: Job, step: int, own_lr: list) -> None:
    """The schedule's rate for ``step``, as the servers apply it (``ps.core.param_groups.Grouped``):
    a group with its own lr (``own_lr``, None where it has none) scaled by
    ``lr_at(step) / OPTIMIZER["lr"]``, the others ``lr_at(step)``."""
    if job.lr_at is None:
        return
    with job.running("lr_at"):
        lr = float(job.lr_at(step))
    for group, own in zip(opt.param_groups, own_lr):
        group["lr"] = lr if own is None else own * (lr / opt.defaults["lr"])


def train(job: Job | str, steps: int, seed: int = 0, parts: int = 1, progress: bool = False):
    """Train ``job`` for ``steps`` global steps; returns (model, per-step mean losses)."""
    job = load_job(job) if isinstance(job, str) else job
    model, dataset = job.build(seed)
    groups = groups_of(job, model)
    own_lr = [g.get("lr") for g in groups]       # before torch fills in its defaults
    opt = torch_optimizer(groups, job.optimizer)
    plan = TaskPlan(len(dataset), job.batch_size, parts, seed=seed, shuffle=job.shuffle)
    params = [p for g in opt.param_groups for p in g["params"]]
    losses, t0 = [], time.monotonic()
    for step in range(steps):
        opt.zero_grad()
        total, loss_sum = plan.batch_len(step), 0.0
        for task in plan.tasks(step):
            batch = collate(dataset, list(task.samples), torch.device("cpu"))
            loss = job.loss(model, batch)
            (loss * len(task.samples)).backward()        # the workers' n * grad(mean loss)
            loss_sum += float(loss.detach()) * len(task.samples)
        for p in params:
            if p.grad is not None:
                p.grad.div_(total)                       # the shards' mean over the samples
        if job.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, job.clip)
        set_lr(opt, job, step, own_lr)
        opt.step()
        losses.append(loss_sum / total)
        if progress and (step + 1) % max(1, steps // 20) == 0:
            print(f"step {step + 1}/{steps}  loss {losses[-1]:.4f}  "
                  f"{time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    return model, losses


def train_diloco(job: Job | str, steps: int, inner_steps: int, workers: int, seed: int = 0,
                 progress: bool = False):
    """Synchronous DiLoCo in one process, as ``--mode diloco`` runs it: ``workers`` model
    copies, each with its own inner optimizer (the job's OPTIMIZER, groups, ``lr_at``,
    clipping), each round every copy starts from the global parameters and takes
    ``inner_steps`` steps on its part j of each global batch (the batch cut into
    ``workers`` contiguous parts); the sample-weighted mean of ``global - copy`` is the
    gradient of one step of the outer optimizer (``OUTER_OPTIMIZER``) on the global
    parameters. Returns (the global model, per-round mean losses)."""
    job = load_job(job) if isinstance(job, str) else job
    model, dataset = job.build(seed)
    copies = [job.build(seed)[0] for _ in range(workers)]
    inner = []
    for copy in copies:
        groups = groups_of(job, copy)
        inner.append(([g.get("lr") for g in groups], torch_optimizer(groups, job.optimizer)))
    outer = torch_optimizer(model.parameters(), job.outer_optimizer)
    plan = TaskPlan(len(dataset), job.batch_size, workers, seed=seed, shuffle=job.shuffle)
    params = list(model.parameters())
    losses = []
    for start in range(0, steps, inner_steps):
        rnd_steps = range(start, min(start + inner_steps, steps))
        deltas = [torch.zeros_like(p) for p in params]
        total, loss_sum = 0, 0.0
        for k, (copy, (own_lr, opt)) in enumerate(zip(copies, inner)):
            with torch.no_grad():
                for p, q in zip(params, copy.parameters()):
                    q.copy_(p)
            mine = [p for g in opt.param_groups for p in g["params"]]
            n_k = 0
            for step in rnd_steps:
                parts = plan.tasks(step)
                if k >= len(parts):                      # a batch smaller than the workers
                    continue
                samples = list(parts[k].samples)
                opt.zero_grad()
                loss = job.loss(copy, collate(dataset, samples, torch.device("cpu")))
                loss.backward()
                if job.clip is not None:
                    torch.nn.utils.clip_grad_norm_(mine, job.clip)
                set_lr(opt, job, step, own_lr)
                opt.step()
                n_k += len(samples)
                loss_sum += float(loss.detach()) * len(samples)
            with torch.no_grad():                        # the shards' sum of n_k (θ - θ_k)
                for d, p, q in zip(deltas, params, copy.parameters()):
                    d.add_((p - q).mul_(n_k))
            total += n_k
        outer.zero_grad()
        for p, d in zip(params, deltas):
            p.grad = d.div_(total)                       # the sample-weighted mean
        outer.step()
        losses.append(loss_sum / total)
        if progress:
            print(f"round {len(losses)}  loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    return model, losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.reference",
                                description="Train a job in one process, as a BSP run on the "
                                            "cluster would: the oracle and the baseline.")
    p.add_argument("--job", required=True, help="the job file")
    p.add_argument("--steps", type=int, help="global steps (default: the job's EPOCHS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", type=int, default=1, help="micro-batches per global batch")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", help="write summary.json (losses, wall_s) and params.npz here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    job = load_job(args.job)
    model, dataset = job.build(args.seed)
    steps = args.steps or (job.epochs or 1) * steps_per_epoch(len(dataset), job.batch_size)
    t0 = time.monotonic()
    model, losses = train(job, steps, args.seed, args.parts, progress=True)
    wall_s = time.monotonic() - t0
    print(f"reference: {steps} steps in {wall_s:.1f} s, final loss {losses[-1]:.4f}")
    if job.finish is not None:
        with job.running("finish"):
            job.finish(model)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({"job": args.job, "steps": steps, "seed": args.seed, "losses": losses,
                       "final_loss": losses[-1], "wall_s": round(wall_s, 3),
                       "threads": torch.get_num_threads()}, f, indent=1)
        np.savez(os.path.join(args.out, "params.npz"),
                 **{n: p.detach().numpy() for n, p in model.named_parameters()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
