"""What the torch baselines (ddp_baseline.py, rpc_baseline.py, rpc_tutorial_baseline.py)
share: their flags, reading a job file and its optimizer, each process's part of a global
batch, a rendezvous file, and starting N processes that all end by a deadline.

Only torch and the standard library, like the baselines themselves: they share no code
with the parameter server.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def parse_args(argv, description: str, count_flag: str, count_help: str,
               device: bool = False) -> argparse.Namespace:
    """The flags both baselines take; ``count_flag`` names how many processes train;
    ``device``: the baseline can also train on CUDA (--device)."""
    p = argparse.ArgumentParser(description=description)
    if device:
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="cuda: NCCL with a GPU per process where there are enough, "
                            "else gloo on CUDA tensors (default cpu)")
    p.add_argument("--job", required=True, help="job file")
    p.add_argument(count_flag, type=int, default=2, help=f"{count_help} (default 2)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: the job's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=300.0, help="deadline of the whole run")
    p.add_argument("--out", required=True, help="JSON result file")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)    # inherited by the spawned processes
    return args


def load_job(path: str):
    """Import a job file (build_model, build_dataset, loss_fn, OPTIMIZER, BATCH_SIZE)."""
    spec = importlib.util.spec_from_file_location("job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def optimizer_args(config: dict) -> tuple[type, dict]:
    """A job's OPTIMIZER, {"name": "adam", "lr": 1e-3} -> (torch.optim.Adam, {"lr": 1e-3})."""
    kwargs = dict(config)
    return OPTIMIZERS[kwargs.pop("name")], kwargs


def batch_indices(step: int, batch: int, rank: int, procs: int, n: int) -> list[int]:
    """Process ``rank``'s part of global batch ``step``: samples [kB, (k+1)B) mod n, cut in N."""
    share = batch // procs
    lo = step * batch + rank * share
    return [i % n for i in range(lo, lo + share)]


def run_ranks(target, ranks: int, args, timeout_s: float, name: str) -> int:
    """Start ``target(rank, args, init_method)`` in ``ranks`` spawned processes; wait for
    all of them until the deadline, kill any still running then. 0 when every one exited 0.

    ``init_method`` is torch's rendezvous URL, a file in a fresh directory (``file://``):
    picking a free TCP port for it and binding it later is a race that another process
    taking the port in between (an outgoing connection's local port, say) loses."""
    ctx = mp.get_context("spawn")
    rendezvous = tempfile.mkdtemp(prefix=f"{name}-")
    init_method = "file://" + os.path.join(rendezvous, "store")
    procs = [ctx.Process(target=target, args=(r, args, init_method)) for r in range(ranks)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
    finally:
        for proc in procs:                               # late or stuck: end it now
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        shutil.rmtree(rendezvous, ignore_errors=True)
    codes = [proc.exitcode for proc in procs]
    if any(code != 0 for code in codes):
        print(f"{name}: process exit codes {codes}", file=sys.stderr)
        return 1
    return 0
