"""What the two torch baselines (ddp_baseline.py, rpc_baseline.py) share: reading a job
file, each process's part of a global batch, a free port for the rendezvous, and
starting N processes that all end by a deadline.

Only torch and the standard library, like the baselines themselves: they share no code
with the parameter server.
"""
from __future__ import annotations

import importlib.util
import socket
import sys
import time

import torch.multiprocessing as mp


def load_job(path: str):
    """Import a job file (build_model, build_dataset, loss_fn, OPTIMIZER, BATCH_SIZE)."""
    spec = importlib.util.spec_from_file_location("job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def batch_indices(step: int, batch: int, rank: int, procs: int, n: int) -> list[int]:
    """Process ``rank``'s part of global batch ``step``: samples [kB, (k+1)B) mod n, cut in N."""
    share = batch // procs
    lo = step * batch + rank * share
    return [i % n for i in range(lo, lo + share)]


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it; a race is possible, and harmless
    here: a clash fails the rendezvous, which has a deadline)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, ranks: int, args, timeout_s: float, name: str) -> int:
    """Start ``target(rank, args, port)`` in ``ranks`` spawned processes; wait for all of
    them until the deadline, kill any still running then. 0 when every one exited 0."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, args, port)) for r in range(ranks)]
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
    codes = [proc.exitcode for proc in procs]
    if any(code != 0 for code in codes):
        print(f"{name}: process exit codes {codes}", file=sys.stderr)
        return 1
    return 0
