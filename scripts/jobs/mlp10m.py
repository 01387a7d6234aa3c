"""An MLP of about 10M parameters: the model of the ``train`` and ``scale`` benchmarks.

Big enough that moving its parameters costs something (40 MB to pull and 40 MB to push
per worker and step) and computing its gradient too (~15 GFLOP per step of 256
samples), so a benchmark on it weighs the data path against compute as real training
does. ``hidden_for(params)`` gives the width of the same architecture at another size:
the ``scale`` suite writes a two-line job file that sets ``HIDDEN`` from it.

The data is a teacher-student problem, as in compute_bound.py: Gaussian inputs, each
labelled by the argmax of a fixed random two-layer tanh network, so the loss falls
from ~2.3 without ever being trivial. Invariant: the data comes from a private
``torch.Generator``, byte-identical on every worker whatever the run's seed. No
shuffling: step k takes samples [kB, (k+1)B), so every system benchmarked on this job
sees the same batches in the same order.
"""
import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

INPUT_DIM = 512        # Gaussian inputs
HIDDEN_LAYERS = 3      # Linear layers of width HIDDEN (input -> hidden -> hidden -> hidden)
NUM_CLASSES = 10       # the teacher's argmax
TEACHER_HIDDEN = 64    # the teacher is small: a function the student can learn
NUM_SAMPLES = 16384    # 64 steps per epoch at BATCH_SIZE 256 (32 MiB of inputs)
DATA_SEED = 13         # private generator seed: same data on every worker


def param_count(hidden: int) -> int:
    """Parameters of the MLP at width ``hidden`` (weights and biases)."""
    return ((INPUT_DIM + 1) * hidden + (HIDDEN_LAYERS - 1) * (hidden + 1) * hidden
            + (hidden + 1) * NUM_CLASSES)


def hidden_for(params: int) -> int:
    """The width whose MLP has about ``params`` parameters (at least 1)."""
    a, b = HIDDEN_LAYERS - 1, INPUT_DIM + 1 + (HIDDEN_LAYERS - 1) + NUM_CLASSES
    c = NUM_CLASSES - params                     # a h^2 + b h + c = 0
    return max(1, round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))


HIDDEN = hidden_for(10_000_000)        # 2109: 10.0M parameters

OPTIMIZER = {"name": "adam", "lr": 1e-3}
BATCH_SIZE = 256       # global batch per step: 128 samples per worker with 2 workers
EPOCHS = 1
SHUFFLE = False


def build_model() -> nn.Module:
    """INPUT_DIM -> HIDDEN (x HIDDEN_LAYERS, ReLU) -> NUM_CLASSES logits. No buffers."""
    layers, width = [], INPUT_DIM
    for _ in range(HIDDEN_LAYERS):
        layers += [nn.Linear(width, HIDDEN), nn.ReLU()]
        width = HIDDEN
    return nn.Sequential(*layers, nn.Linear(width, NUM_CLASSES))


def _teacher_data():
    """Return (x (n, INPUT_DIM) float32, labels (n,) int64) labelled by a random network."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(NUM_SAMPLES, INPUT_DIM, generator=gen)                     # (n, 512)
    w1 = torch.randn(INPUT_DIM, TEACHER_HIDDEN, generator=gen) / INPUT_DIM ** 0.5
    w2 = torch.randn(TEACHER_HIDDEN, NUM_CLASSES, generator=gen)
    labels = (torch.tanh(x @ w1) @ w2).argmax(dim=1)                           # (n,)
    return x, labels


def build_dataset() -> TensorDataset:
    """Map-style data set of (x (INPUT_DIM,) float32, label () int64) pairs."""
    return TensorDataset(*_teacher_data())


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of a collated batch [X (b, INPUT_DIM), Y (b,)]."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)
