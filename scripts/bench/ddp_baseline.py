"""Baseline: torch DistributedDataParallel (gloo) training a job file, N processes here.

    python scripts/bench/ddp_baseline.py --job scripts/jobs/mlp10m.py --procs 2 \\
        --steps 30 --warmup 3 --threads 1 --out ddp.json

What a user of plain PyTorch would run instead of a parameter server. Every rank
builds the job's model from the same seed, wraps it in DDP (gloo backend, rendezvous
through a file, traffic over TCP on this machine) and trains on its share of every
global batch: step k uses samples [kB, (k+1)B) of the data set (wrapping around), rank r the r-th
of N equal parts. During backward DDP all-reduces the gradients in buckets and
averages them, so every rank applies the same update, the global batch's mean
gradient, with its own copy of the job's optimizer: the same update BSP makes.

Rank 0 times the steps after ``--warmup`` (from the end of step warmup - 1 to the end
of the last step) and writes {samples_per_s, step_s, ...} as JSON to ``--out``.
Only torch and the standard library (and scripts/bench/baseline.py, shared with the RPC
baseline): it reads the job file itself, and shares no code with the parameter server.
Every process it starts is ended, every wait has a
deadline (``--timeout-s``).
"""
from __future__ import annotations

import datetime
import json
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import default_collate

from baseline import (batch_indices, load_job, optimizer_args, parse_args,   # bench/baseline.py
                      run_ranks)


def make_optimizer(config: dict, params) -> torch.optim.Optimizer:
    """{"name": "adam", "lr": 1e-3, ...} -> torch.optim.Adam(params, lr=1e-3, ...)."""
    cls, kwargs = optimizer_args(config)
    return cls(params, **kwargs)


def to(batch, device: torch.device):
    """A collated batch (tensors, tuples, lists, dicts of them) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to(v, device) for k, v in batch.items()}
    return batch


def rank_main(rank: int, args, init_method: str) -> None:
    """One DDP process: join the group, train ``warmup + steps`` steps, rank 0 reports."""
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    backend = "gloo"
    if args.device == "cuda":            # NCCL wants a GPU of its own per rank; with fewer
        device = torch.device("cuda", rank % torch.cuda.device_count())   # GPUs, gloo on CUDA
        torch.cuda.set_device(device)
        backend = "nccl" if torch.cuda.device_count() >= args.procs else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=args.procs,
                            timeout=datetime.timedelta(seconds=args.timeout_s))
    try:
        job = load_job(args.job)
        torch.manual_seed(args.seed)                     # the same initial values on every rank
        model = DistributedDataParallel(job.build_model().to(device))
        torch.manual_seed(args.seed)
        dataset = job.build_dataset()
        optimizer = make_optimizer(job.OPTIMIZER, model.parameters())
        batch = args.batch or job.BATCH_SIZE
        ends, losses = [], []
        for step in range(args.warmup + args.steps):
            x = to(default_collate([dataset[i] for i in
                                    batch_indices(step, batch, rank, args.procs, len(dataset))]),
                   device)
            optimizer.zero_grad(set_to_none=True)
            loss = job.loss_fn(model, x)
            loss.backward()                              # all-reduce overlaps the backward pass
            optimizer.step()
            losses.append(loss.item())                   # rank's own half batch (and a sync)
            ends.append(time.perf_counter())
        if rank == 0:
            step_s = (ends[-1] - ends[args.warmup - 1]) / args.steps
            with open(args.out, "w") as f:
                json.dump({"system": "ddp", "procs": args.procs, "threads": args.threads,
                           "device": device.type, "backend": backend,
                           "batch": batch, "steps": args.steps, "warmup": args.warmup,
                           "step_s": step_s, "samples_per_s": batch / step_s,
                           "params": sum(p.numel() for p in model.parameters()),
                           "optimizer": job.OPTIMIZER["name"], "losses_rank0": losses}, f)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv, __doc__.split("\n\n")[0], "--procs", "DDP processes",
                      device=True)
    return run_ranks(rank_main, args.procs, args, args.timeout_s, "ddp_baseline")


if __name__ == "__main__":
    sys.exit(main())
