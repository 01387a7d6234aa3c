"""A compute-bound job for the stragglers benchmark: an MLP whose tasks take tens of ms.

Work stealing only matters when computing a task costs much more than leasing, pulling
and pushing it, so this job makes compute dominate: ~0.86M parameters (3.4 MB to pull
and to push per step and worker, and one Adam step on the server) against 8192 samples
of ~5 MFLOP each per step. On one thread of this machine's CPU (~140 GFLOP/s measured
for these shapes) a task of BATCH_SIZE / (4 x workers) samples takes ~40 ms with 2
workers (1024 samples) and ~20 ms with 4 (512 samples; about twice that when 4 workers
share 2 cores). Compute : transfer per step is set by the samples per worker and step,
not by the model's size, so the model is kept modest: the server's per-push optimizer
step (ASP pushes every task) and the data path stay small next to compute.

The data is a teacher-student problem: Gaussian inputs, each labelled by the argmax of
a fixed random two-layer tanh network (the teacher), so the loss falls steadily from
~2.3 over the first few dozen steps without ever being trivial. Invariant: the data
comes from a private ``torch.Generator``, so it is byte-identical on every worker
whatever seed the run uses for the model. No shuffling: step k takes samples
[kB, (k+1)B), so every run sees the same batches in the same order.
"""
import torch
from torch import nn
from torch.utils.data import TensorDataset

INPUT_DIM = 128        # Gaussian inputs
HIDDEN = 512           # 4 hidden layers of 512: ~0.86M parameters, ~5 MFLOP per sample
NUM_CLASSES = 10       # the teacher's argmax
TEACHER_HIDDEN = 64    # the teacher is small: a function the student can learn
NUM_SAMPLES = 131072   # 16 steps per epoch at BATCH_SIZE 8192 (64 MiB of inputs)
DATA_SEED = 11         # private generator seed: same data on every worker

OPTIMIZER = {"name": "adam", "lr": 1e-3}
BATCH_SIZE = 8192      # 1024 samples a task with 2 workers, 512 with 4 (4 tasks per worker)
EPOCHS = 2
SHUFFLE = False


def build_model() -> nn.Module:
    """128 -> 512 -> 512 -> 512 -> 512 -> 10 logits, ReLU. No buffers."""
    return nn.Sequential(
        nn.Linear(INPUT_DIM, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, NUM_CLASSES),
    )


def _teacher_data():
    """Return (x (n, 128) float32, labels (n,) int64) labelled by a random tanh network."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(NUM_SAMPLES, INPUT_DIM, generator=gen)                    # (n, 128)
    w1 = torch.randn(INPUT_DIM, TEACHER_HIDDEN, generator=gen) / INPUT_DIM ** 0.5
    w2 = torch.randn(TEACHER_HIDDEN, NUM_CLASSES, generator=gen)
    labels = (torch.tanh(x @ w1) @ w2).argmax(dim=1)                          # (n,)
    return x, labels


def build_dataset() -> TensorDataset:
    """Map-style data set of (x (128,) float32, label () int64) pairs."""
    return TensorDataset(*_teacher_data())


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of a collated batch [X (b, 128), Y (b,)]."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)
