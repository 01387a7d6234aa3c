"""Baseline: the parameter server of PyTorch's RPC tutorial, trainers in N processes here.

    python scripts/bench/rpc_tutorial_baseline.py --job scripts/jobs/mlp10m.py \\
        --trainers 2 --steps 30 --warmup 3 --threads 1 --out rpc_tutorial.json

The design of "Implementing a Parameter Server Using Distributed RPC Framework"
(pytorch.org/tutorials/intermediate/rpc_param_server_tutorial.html), kept as written
there but for one lock. Process 0 is the parameter server ("ps"): a ``ParameterServer``
module holding the job's model, made by the first trainer's ``rpc.remote`` call. The
others are trainers. A trainer's ``TrainerNet`` has no parameters: its forward sends the
input to the server's forward through the RRef (``rpc_sync``) and gets the output back;
the trainer computes the job's loss on it, runs ``dist_autograd.backward`` in a
``dist_autograd.context`` (the backward pass crosses back into the server, whose
parameters collect the gradients in that context), and steps with its own
``DistributedOptimizer`` over the parameters' RRefs (the job's optimizer and settings;
torch runs it on the server as a TorchScript functional optimizer). Trainer r's step k
uses the r-th of N equal parts of global batch k, samples [kB, (k+1)B) of the data set
(wrapping around), as in the other baselines. Left out: the tutorial's per-step check
that gradients arrived (``get_dist_gradients``), a debugging aid costing a round trip.

The lock: as written, two trainers fail on torch 2.13. One trainer's optimizer step
changes in place parameters that the other's forward saved for its backward, and that
backward stops with "RuntimeError: Error on Node 0: one of the variables needed for
gradient computation has been modified by an inplace operation: [torch.FloatTensor
[64, 256]] ... is at version 19; expected version 17 instead" (the language model of
examples/char_transformer.py; the tensor and versions vary from run to run). So a
trainer holds a lock in process 0 for its whole step (forward, backward, optimizer
step): ``acquire`` before, ``release`` in a ``finally``. A wait for the lock has a
deadline (half of --timeout-s, under the RPC timeout, so the server answers before the
caller gives up); releasing a lock one does not hold does nothing.

What differs from a global-batch update (DDP, BSP, rpc_baseline.py): each trainer step
is one update on batch / N samples, so a global batch is N updates one after another,
each gradient taken at parameters the previous update changed, not one update with the
batch's mean gradient. Each trainer's ``DistributedOptimizer`` makes its own optimizer
on the server: with Adam, N sets of moments and step counts over the same parameters,
each fed one trainer's gradients. And all model compute, forward and backward, runs in
the server process, one trainer at a time under the lock; a trainer only collates its
data and computes the loss on the output, so more trainers add no model compute. The loss
curves differ; only samples per second compare.

Timing: the server notes when each update ends (the trainer's ``release`` after its
optimizer step). After the first warmup x N updates, from the end of update warmup x N
to the end of the last: ``samples_per_s`` is the samples trained in that window by all
trainers (updates x batch / N) over its length; ``step_s`` is the time of N updates, one
global batch's worth of samples, so samples_per_s x step_s = batch as in the other
baselines. The server writes {samples_per_s, step_s, ...} as JSON to ``--out``.
Only torch and the standard library (and scripts/bench/baseline.py). Every process it
starts is ended, every wait has a deadline (``--timeout-s``; it is also the RPC timeout).
"""
from __future__ import annotations

import json
import sys
import threading
import time

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
from torch import nn
from torch.distributed.optim import DistributedOptimizer
from torch.utils.data import default_collate

from baseline import (batch_indices, load_job, optimizer_args, parse_args,   # bench/baseline.py
                      run_ranks)

RPC_THREADS = 16         # torch's default pool, plus one per trainer: a trainer waiting
                         # for the step lock holds a server thread until it gets it
PARAM_SERVER = None      # the ParameterServer, in process 0 only, made on first call
SERVER_LOCK = threading.Lock()   # trainers' first calls arrive on several RPC threads


# -- the server (process 0) --------------------------------------------------------------
class ParameterServer(nn.Module):
    """The job's model; trainers run its forward through an RRef to this object."""

    def __init__(self, job_path: str, seed: int):
        super().__init__()
        torch.manual_seed(seed)                   # the same initial values as the others
        self.model = load_job(job_path).build_model()

    def forward(self, x):
        return self.model(x)

    def get_param_rrefs(self) -> list[rpc.RRef]:
        return [rpc.RRef(p) for p in self.model.parameters()]


def get_parameter_server(job_path: str, seed: int) -> ParameterServer:
    """The one server object; the first trainer to call makes it."""
    global PARAM_SERVER
    with SERVER_LOCK:
        if PARAM_SERVER is None:
            PARAM_SERVER = ParameterServer(job_path, seed)
        return PARAM_SERVER


class StepLock:
    """One trainer's step at a time, and when each step ended (the timing's clock)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.holder = None                        # the trainer stepping, or None
        self.ends: list[float] = []               # perf_counter at each update's end

    def acquire(self, trainer: int, wait_s: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.holder is None, wait_s):
                raise TimeoutError(f"trainer {trainer}: the step lock was held by trainer "
                                   f"{self.holder} for over {wait_s:g} s")
            self.holder = trainer

    def release(self, trainer: int, trained: bool) -> None:
        with self.cond:
            if self.holder != trainer:            # its acquire failed: nothing to release
                return
            if trained:
                self.ends.append(time.perf_counter())
            self.holder = None
            self.cond.notify()


STEP_LOCK = StepLock()   # used in process 0 only


def acquire(trainer: int, wait_s: float) -> None:
    STEP_LOCK.acquire(trainer, wait_s)


def release(trainer: int, trained: bool) -> None:
    STEP_LOCK.release(trainer, trained)


def call_method(method, rref, *args, **kwargs):
    return method(rref.local_value(), *args, **kwargs)


def remote_method(method, rref, *args, **kwargs):
    """Run ``method`` on the object ``rref`` refers to, where it lives; its result."""
    return rpc.rpc_sync(rref.owner(), call_method, args=[method, rref, *args], kwargs=kwargs)


# -- a trainer ---------------------------------------------------------------------------
class TrainerNet(nn.Module):
    """A model with no parameters of its own: its forward is the server's."""

    def __init__(self, job_path: str, seed: int):
        super().__init__()
        self.param_server_rref = rpc.remote("ps", get_parameter_server, args=(job_path, seed))

    def get_global_param_rrefs(self) -> list[rpc.RRef]:
        return remote_method(ParameterServer.get_param_rrefs, self.param_server_rref)

    def forward(self, x):
        return remote_method(ParameterServer.forward, self.param_server_rref, x)


def train(job, args, trainer: int) -> None:
    """Run warmup + steps steps, each one update of the server's model under the lock."""
    torch.manual_seed(args.seed)
    dataset = job.build_dataset()
    batch = args.batch or job.BATCH_SIZE
    net = TrainerNet(args.job, args.seed)
    cls, kwargs = optimizer_args(job.OPTIMIZER)
    opt = DistributedOptimizer(cls, net.get_global_param_rrefs(), **kwargs)
    for step in range(args.warmup + args.steps):
        x = default_collate([dataset[i] for i in
                             batch_indices(step, batch, trainer, args.trainers, len(dataset))])
        trained = False
        try:
            rpc.rpc_sync("ps", acquire, args=(trainer, args.timeout_s / 2))
            with dist_autograd.context() as cid:
                loss = job.loss_fn(net, x)        # the forward runs on the server
                dist_autograd.backward(cid, [loss])
                opt.step(cid)                     # this trainer's optimizer, on the server
            trained = True
        finally:
            rpc.rpc_sync("ps", release, args=(trainer, trained))


def report(job, args) -> None:
    """Samples per second of all trainers together, from the server's update ends."""
    ends, n = STEP_LOCK.ends, args.trainers
    if len(ends) != (args.warmup + args.steps) * n:
        raise RuntimeError(f"{len(ends)} updates, not {(args.warmup + args.steps) * n}")
    batch = args.batch or job.BATCH_SIZE
    first = args.warmup * n - 1                   # the end of the last untimed update
    updates = len(ends) - 1 - first
    window_s = ends[-1] - ends[first]
    with open(args.out, "w") as f:
        json.dump({"system": "rpc_tutorial", "trainers": n, "threads": args.threads,
                   "batch": batch, "steps": args.steps, "warmup": args.warmup,
                   "step_s": window_s * n / updates,                  # N updates: one batch
                   "samples_per_s": updates * (batch // n) / window_s,
                   "params": sum(p.numel() for p in job.build_model().parameters()),
                   "optimizer": job.OPTIMIZER["name"]}, f)


def rank_main(rank: int, args, init_method: str) -> None:
    """Process 0 serves and reports; the others train."""
    torch.set_num_threads(args.threads)
    job = load_job(args.job)
    options = rpc.TensorPipeRpcBackendOptions(init_method=init_method,
                                              rpc_timeout=args.timeout_s,
                                              num_worker_threads=RPC_THREADS + args.trainers)
    rpc.init_rpc("ps" if rank == 0 else f"trainer{rank - 1}", rank=rank,
                 world_size=args.trainers + 1, rpc_backend_options=options)
    try:
        if rank > 0:
            train(job, args, rank - 1)
    finally:
        rpc.shutdown()                            # waits for every process's outstanding calls
    if rank == 0:
        report(job, args)


def main(argv=None) -> int:
    args = parse_args(argv, __doc__.split("\n\n")[0], "--trainers", "trainer processes")
    return run_ranks(rank_main, args.trainers + 1, args, args.timeout_s,
                     "rpc_tutorial_baseline")


if __name__ == "__main__":
    sys.exit(main())
