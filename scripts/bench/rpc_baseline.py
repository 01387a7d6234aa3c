"""Baseline: a parameter server on torch.distributed.rpc, trainers in N processes here.

    python scripts/bench/rpc_baseline.py --job scripts/jobs/mlp10m.py --trainers 2 \\
        --steps 30 --warmup 3 --threads 1 --out rpc.json

What a user would build from PyTorch's RPC tutorials instead of using this project.
Process 0 is the parameter server ("ps"): it holds the model and the optimizer. The
others are trainers; step k uses samples [kB, (k+1)B) of the data set (wrapping
around), trainer r the r-th of N equal parts. As in "Implementing a Parameter Server
Using Distributed RPC Framework", trainers call the server with ``rpc_sync``; as in
"Implementing Batch RPC Processing Using Asynchronous Executions", the server updates
in batches: each step a trainer computes its gradient on its own replica and sends it
(``push_and_pull``); the server sums the trainers' gradients, and once all N are in,
averages them, runs the optimizer once and answers every trainer with the new
parameters (``@rpc.functions.async_execution`` holds the replies until then). That is
the update BSP and DDP make, so its steps compare with theirs one for one.

The first tutorial's own design, forward on the server through an RRef,
``dist_autograd`` and a ``DistributedOptimizer`` per trainer, is not this file's: with
two trainers sharing the server's model, one trainer's optimizer step changes parameters
in place that the other's backward pass has saved, and autograd stops that trainer
("modified by an inplace operation"; torch 2.13). It also puts all compute in the server
process and applies one update per trainer and step, not a global batch. It is measured
beside this one, with a lock that runs one trainer's step at a time, by
rpc_tutorial_baseline.py.

Trainer 0 times the steps after ``--warmup`` (from the end of step warmup - 1 to the
end of the last step) and writes {samples_per_s, step_s, ...} as JSON to ``--out``.
Only torch and the standard library (and scripts/bench/baseline.py, shared with the DDP
baseline). Every process it starts is ended, every wait has
a deadline (``--timeout-s``; it is also the RPC timeout).
"""
from __future__ import annotations

import json
import sys
import threading
import time

import torch
import torch.distributed.rpc as rpc
from torch.utils.data import default_collate

from baseline import (batch_indices, load_job, optimizer_args, parse_args,   # bench/baseline.py
                      run_ranks)

SERVER = None            # the ParameterServer, in process 0 only


# -- the server (process 0) --------------------------------------------------------------
class ParameterServer:
    """The model, its optimizer, and the step's gradient sum."""

    def __init__(self, job, trainers: int, seed: int):
        torch.manual_seed(seed)                   # the same initial values as the others
        self.model = job.build_model()
        self.params = list(self.model.parameters())
        cls, kwargs = optimizer_args(job.OPTIMIZER)
        self.optimizer = cls(self.params, **kwargs)
        self.trainers = trainers
        self.lock = threading.Lock()              # RPC calls arrive on several threads
        self.arrived = 0
        self.future = torch.futures.Future()      # answered when the step's last push is in
        for p in self.params:
            p.grad = torch.zeros_like(p)

    def values(self) -> list[torch.Tensor]:
        # A copy: the reply is serialized after this returns, and must not see a later step.
        return [p.detach().clone() for p in self.params]


def initial_params() -> list[torch.Tensor]:
    return SERVER.values()


@rpc.functions.async_execution
def push_and_pull(grads: list[torch.Tensor]) -> torch.futures.Future:
    """Add one trainer's gradient; the last of a step averages, steps, and answers all."""
    server = SERVER
    with server.lock:
        for p, g in zip(server.params, grads):
            p.grad.add_(g)
        server.arrived += 1
        future = server.future
        if server.arrived == server.trainers:
            for p in server.params:
                p.grad.div_(server.trainers)      # mean of the trainers' means: the batch mean
            server.optimizer.step()
            for p in server.params:
                p.grad.zero_()
            server.arrived, server.future = 0, torch.futures.Future()
            future.set_result(server.values())
    return future


# -- a trainer ---------------------------------------------------------------------------
def train(job, args, trainer: int) -> list[float]:
    """Run warmup + steps steps; return when each ended (perf_counter seconds)."""
    torch.manual_seed(args.seed)
    dataset = job.build_dataset()
    batch = args.batch or job.BATCH_SIZE
    model = job.build_model()                     # a replica; its values come from the server
    params = list(model.parameters())
    values = rpc.rpc_sync("ps", initial_params)
    ends = []
    for step in range(args.warmup + args.steps):
        x = default_collate([dataset[i] for i in
                             batch_indices(step, batch, trainer, args.trainers, len(dataset))])
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)                        # the server's parameters into the replica
        model.zero_grad(set_to_none=True)
        job.loss_fn(model, x).backward()
        values = rpc.rpc_sync("ps", push_and_pull, args=([p.grad for p in params],))
        ends.append(time.perf_counter())
    return ends


def rank_main(rank: int, args, init_method: str) -> None:
    """Process 0 serves; the others train; trainer 0 reports."""
    global SERVER
    torch.set_num_threads(args.threads)
    job = load_job(args.job)
    if rank == 0:
        SERVER = ParameterServer(job, args.trainers, args.seed)    # before anyone can call
    options = rpc.TensorPipeRpcBackendOptions(init_method=init_method,
                                              rpc_timeout=args.timeout_s)
    rpc.init_rpc("ps" if rank == 0 else f"trainer{rank - 1}", rank=rank,
                 world_size=args.trainers + 1, rpc_backend_options=options)
    try:
        if rank == 1:
            ends = train(job, args, 0)
            step_s = (ends[-1] - ends[args.warmup - 1]) / args.steps
            batch = args.batch or job.BATCH_SIZE
            with open(args.out, "w") as f:
                json.dump({"system": "rpc", "trainers": args.trainers,
                           "threads": args.threads, "batch": batch, "steps": args.steps,
                           "warmup": args.warmup, "step_s": step_s,
                           "samples_per_s": batch / step_s,
                           "params": sum(p.numel() for p in job.build_model().parameters()),
                           "optimizer": job.OPTIMIZER["name"]}, f)
        elif rank > 1:
            train(job, args, rank - 1)
    finally:
        rpc.shutdown()                            # waits for every process's outstanding calls


def main(argv=None) -> int:
    args = parse_args(argv, __doc__.split("\n\n")[0], "--trainers", "trainer processes")
    return run_ranks(rank_main, args.trainers + 1, args, args.timeout_s, "rpc_baseline")


if __name__ == "__main__":
    sys.exit(main())
