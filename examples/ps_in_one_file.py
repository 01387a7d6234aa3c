"""A parameter server in one file: the idea behind ps/, with no sockets.

The model's parameters are one flat float32 vector cut into S contiguous ranges; server
k (a "shard") owns range k and its optimizer state. Each BSP step, M workers pull every
shard's slice into their model, compute the gradient SUM over their tasks (micro-batches
of the step's global batch) and push each shard its slice of it, tagged with the task
ids and sample count. A shard adds up the pushes, refuses one naming a task it already
has (exactly once: a retry changes nothing), and when every task of the step is in,
steps its optimizer once on sum / samples: its version becomes step + 1. That is
single-process torch on the same global batches, up to rounding; running this checks it.

ps/ adds the wire, event loops, a scheduler, SSP/ASP, stealing and fault recovery; its
pure core (ps/core/shard.py, optim.py) passes tests/test_core_oracle.py in the toy's place.
"""
import copy
import random

import numpy as np
import torch
from torch import nn

SERVERS = 2              # S: shards of the flat parameter vector
WORKERS = 3              # M: simulated workers, each with its own copy of the model
STEPS = 40               # global BSP steps (over 3 epochs of the data below)
NUM_SAMPLES = 100        # 100 = 3 x 32 + 4: every epoch ends with a short batch
BATCH_SIZE = 32          # the global batch of one step, shared out among the workers
TASKS_PER_WORKER = 2     # tasks (micro-batches) per worker per step
DUPLICATE_EVERY = 3      # resend every 3rd push of a step, as a retry would
OPTIMIZERS = [{"name": "sgd", "lr": 0.05, "momentum": 0.9},   # torch's argument names
              {"name": "adam", "lr": 0.01}]


# -- layout: the flat vector and its cut into shards ------------------------------------
def flat_views(model):
    """Make every parameter a view into one flat float32 vector, and every .grad a view
    into a second one. Returns both as numpy arrays sharing that memory, (total,) each."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    flat_params = torch.empty(total, dtype=torch.float32)     # (total,)
    flat_grads = torch.zeros(total, dtype=torch.float32)      # (total,)
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            flat_params[offset:offset + n].copy_(p.reshape(-1))
            # Why: a pull is then one copy straight into the model's storage, and since
            # backward adds into an existing .grad in place, shard k's gradient is just
            # flat_grads[lo:hi]: no gather before a push.
            p.data = flat_params[offset:offset + n].view_as(p)
            p.grad = flat_grads[offset:offset + n].view_as(p)
            offset += n
    return flat_params.numpy(), flat_grads.numpy()


def cut(total, num_shards):
    """[0, total) as ``num_shards`` contiguous ranges whose sizes differ by at most one."""
    # By element, not by tensor: a huge tensor may span shards, none holds > ceil(total/S).
    bounds = [k * total // num_shards for k in range(num_shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


# -- the server's optimizer: torch.optim's formulas, in numpy, in place -----------------
class SGD:
    def __init__(self, size, lr, momentum=0.0):
        self.lr, self.momentum, self.steps = lr, momentum, 0
        self.buf = np.zeros(size, np.float32)                  # (n,) momentum buffer

    def step(self, p, g):
        self.steps += 1
        if self.momentum:              # torch starts the buffer at the first gradient, not 0
            self.buf[:] = g if self.steps == 1 else self.momentum * self.buf + g
            g = self.buf
        p -= self.lr * g               # a Python float times float32 stays float32, as in torch


class Adam:
    def __init__(self, size, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.lr, (self.b1, self.b2), self.eps, self.steps = lr, betas, eps, 0
        self.m = np.zeros(size, np.float32)                    # (n,) first moment
        self.v = np.zeros(size, np.float32)                    # (n,) second moment

    def step(self, p, g):
        self.steps += 1
        self.m += (1 - self.b1) * (g - self.m)                 # torch: m.lerp_(g, 1 - b1)
        self.v[:] = self.b2 * self.v + (1 - self.b2) * g * g   # torch: mul_, addcmul_
        step_size = self.lr / (1 - self.b1 ** self.steps)      # bias corrections in float64,
        bc2_sqrt = (1 - self.b2 ** self.steps) ** 0.5          # as torch computes them
        p += -step_size * self.m / (np.sqrt(self.v) / bc2_sqrt + self.eps)


def make_optimizer(config, size):
    args = {k: v for k, v in config.items() if k != "name"}
    return {"sgd": SGD, "adam": Adam}[config["name"]](size, **args)


# -- the shard: BSP aggregation, exactly once, the pull gate ----------------------------
class Shard:
    """One server's slice of the flat vector and its optimizer, with BSP's rules."""

    def __init__(self, initial, optimizer):
        self.params = initial                                   # (n,) float32, its own copy
        self.optimizer = make_optimizer(optimizer, initial.size)
        self.grad = np.zeros_like(self.params)                  # (n,) the step's gradient sum
        self.version = 0                                        # optimizer steps applied
        self.step_tasks_seen = set()                            # task ids summed into grad
        self.step_samples = 0
        self.duplicates_rejected = 0

    def is_duplicate(self, step, tasks):
        # A push for a completed step, or naming a task already summed, is a retry or a
        # copy: its gradient is in already. (Once a step is done, all its tasks are.)
        return step < self.version or any(t in self.step_tasks_seen for t in tasks)

    def push(self, step, tasks, samples, step_tasks, grad):
        """Add one push (the gradient SUM over ``tasks``, ``samples`` samples in all) to
        step ``step``, which has ``step_tasks`` tasks. False: refused, nothing changed."""
        if self.is_duplicate(step, tasks):
            self.duplicates_rejected += 1
            return False
        if step != self.version:
            raise ValueError(f"push for step {step}, shard is at version {self.version}")
        self.grad += grad
        self.step_tasks_seen.update(tasks)
        self.step_samples += samples
        if len(self.step_tasks_seen) == step_tasks:   # the whole global batch is in
            # Why divide here and not on the workers: sums add up whatever the split
            # into tasks, and sum / samples is exactly the global batch's mean gradient.
            self.optimizer.step(self.params, self.grad / self.step_samples)
            self.grad[:] = 0
            self.step_tasks_seen, self.step_samples = set(), 0
            self.version += 1
        return True

    def pull_ready(self, version):
        """May a pull for ``version`` be answered? (BSP: once this shard has it.)"""
        return self.version >= version


# -- the loop: M simulated workers, S shards --------------------------------------------
def global_batch(step, num_samples, batch_size):
    """Sample ids of ``step``: consecutive slices, epoch after epoch, the last one short."""
    per_epoch = -(-num_samples // batch_size)
    lo = (step % per_epoch) * batch_size
    return torch.arange(lo, min(lo + batch_size, num_samples))     # (B,) sample ids


def pull(params, bounds, shards, version):
    """Copy every shard's slice, at ``version``, into a worker's flat parameters."""
    for (lo, hi), shard in zip(bounds, shards):
        if not shard.pull_ready(version):      # BSP: never read a step half-applied
            raise RuntimeError(f"a shard is behind version {version}")
        params[lo:hi] = shard.params           # (hi - lo,) lands in the model's storage


def train(model, dataset, loss_fn, optimizer, batch_size, servers, workers, steps,
          tasks_per_worker=1, shuffle_pushes=False, duplicate_every=0, make_shard=Shard):
    """BSP training on S shards and M workers; ``loss_fn(model, dataset[ids])`` is a
    batch's MEAN loss (the job contract); ``make_shard(initial, optimizer)`` builds a shard.
    Returns the final parameters by name, and the duplicates sent and refused."""
    replicas = [copy.deepcopy(model) for _ in range(workers)]   # one model per worker
    flats = [flat_views(m) for m in replicas]                   # per worker: (total,) x 2
    bounds = cut(flats[0][0].size, servers)                     # S ranges (lo, hi)
    shards = [make_shard(flats[0][0][lo:hi].copy(), optimizer) for lo, hi in bounds]
    tasks_per_step = workers * tasks_per_worker
    counts = {"duplicates_sent": 0}
    for step in range(steps):
        batch = global_batch(step, len(dataset), batch_size)    # (B,)
        parts = torch.tensor_split(batch, min(tasks_per_step, len(batch)))   # (~B/T,) each
        tasks = [(step * tasks_per_step + j, ids) for j, ids in enumerate(parts)]  # ids unique
        pushes = []                                             # (shard k, push arguments)
        for w, (params, grads) in enumerate(flats):
            pull(params, bounds, shards, step)
            grads[:] = 0
            mine = tasks[w::workers]            # dealt round robin (no stealing here)
            for _, ids in mine:
                # loss * n: the task's gradient SUM, which backward adds into `grads`.
                (loss_fn(replicas[w], dataset[ids]) * len(ids)).backward()
            task_ids, samples = [t for t, _ in mine], sum(len(ids) for _, ids in mine)
            pushes += [(k, (step, task_ids, samples, len(tasks), grads[lo:hi]))
                       for k, (lo, hi) in enumerate(bounds) if mine]
        if duplicate_every:                     # a retry resends the very same push
            again = pushes[::duplicate_every]
            pushes += again
            counts["duplicates_sent"] += len(again)
        if shuffle_pushes:                      # the network promises no order
            random.Random(step).shuffle(pushes)   # (seeded: a rerun replays it)
        for k, push in pushes:
            shards[k].push(*push)
        if any(s.version != step + 1 for s in shards):
            raise RuntimeError(f"step {step} did not complete on every shard")
    pull(flats[0][0], bounds, shards, steps)                    # read the result out
    counts["duplicates_rejected"] = sum(s.duplicates_rejected for s in shards)
    return {n: p.detach().numpy().copy() for n, p in replicas[0].named_parameters()}, counts


def single_process(model, dataset, loss_fn, optimizer, batch_size, steps):
    """The oracle: plain torch, one mean-loss backward over the global batch per step."""
    args = {k: v for k, v in optimizer.items() if k != "name"}
    opt = getattr(torch.optim, {"sgd": "SGD", "adam": "Adam"}[optimizer["name"]])(
        model.parameters(), **args)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, dataset[global_batch(step, len(dataset), batch_size)]).backward()
        opt.step()
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


if __name__ == "__main__":
    torch.manual_seed(0)
    x = torch.randn(NUM_SAMPLES, 4)                                      # (N, 4)
    y = (x[:, :1] * x[:, 1:2]).tanh() + 0.1 * torch.randn(NUM_SAMPLES, 1)   # (N, 1)
    dataset = torch.utils.data.TensorDataset(x, y)          # dataset[ids] -> (x[ids], y[ids])
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def loss_fn(model, batch):
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    worst = 0.0
    for opt in OPTIMIZERS:
        got, counts = train(model, dataset, loss_fn, opt, BATCH_SIZE, SERVERS, WORKERS,
                            STEPS, TASKS_PER_WORKER, shuffle_pushes=True,
                            duplicate_every=DUPLICATE_EVERY)
        want = single_process(copy.deepcopy(model), dataset, loss_fn, opt, BATCH_SIZE, STEPS)
        diff = max(float(np.abs(got[n] - want[n]).max()) for n in want)
        scale = max(float(np.abs(w).max()) for w in want.values())
        worst = max(worst, diff / scale)
        print(f"{opt['name']:4s} S={SERVERS} M={WORKERS}, {STEPS} steps: max |ps - torch| = "
              f"{diff:.1e} (max |w| {scale:.2f}), {counts['duplicates_rejected']} of "
              f"{counts['duplicates_sent']} duplicate pushes refused")
    print("matches single-process torch" if worst < 1e-5 else "DOES NOT MATCH torch")
    raise SystemExit(0 if worst < 1e-5 else 1)
