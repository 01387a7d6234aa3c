"""Linear regression: the smallest job, with an answer known in advance.

Every worker imports this file and calls `build_model`, `build_dataset` and `loss_fn`;
worker 0 calls `finish` once after training. The data is noise-free,
y = X @ TRUE_WEIGHT + TRUE_BIAS, so the least-squares solution is exactly the true
parameters and a correct cluster run must drive the error towards zero. That makes this
the job to reach for when checking that pushes, pulls and the optimizer update are right:
any lost or doubled gradient shows up as a weight that does not converge.

Invariant: the data is byte-identical on every worker, because it comes from a private
`torch.Generator` with a fixed seed rather than from the global torch RNG.
"""
import torch
from torch import nn
from torch.utils.data import TensorDataset

NUM_FEATURES = 8        # input width; small so a full-batch solve is instant in tests
NUM_SAMPLES = 1024      # 16 steps per epoch at BATCH_SIZE 64
DATA_SEED = 1234        # private generator seed: same data on every worker, any run seed

# The answer. Plain lists so a test (or a reader) can compare against them directly.
TRUE_WEIGHT = [0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, -2.0]
TRUE_BIAS = 0.75

OPTIMIZER = {"name": "sgd", "lr": 0.1}   # features are unit-variance, so lr 0.1 is stable
BATCH_SIZE = 64                           # global batch per step, split across workers
EPOCHS = 20                               # 320 steps: error falls below 1e-6
SHUFFLE = True


def build_model() -> nn.Module:
    """One linear layer, 8 weights and 1 bias, initialised from the run's seeded RNG."""
    return nn.Linear(NUM_FEATURES, 1)


def build_dataset() -> TensorDataset:
    """Noise-free samples (x, y) with x ~ N(0, I) and y = x @ w_true + b_true."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=gen)   # (n, 8) float32
    w = torch.tensor(TRUE_WEIGHT).unsqueeze(1)                   # (8, 1)
    y = x @ w + TRUE_BIAS                                        # (n, 1)
    return TensorDataset(x, y)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    """Mean squared error of a collated batch [X (b, 8), Y (b, 1)]."""
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def finish(model: nn.Module) -> None:
    """Print how far the trained parameters are from the true ones."""
    w = model.weight.detach().squeeze(0)                          # (8,)
    err_w = (w - torch.tensor(TRUE_WEIGHT)).abs().max().item()
    err_b = abs(model.bias.item() - TRUE_BIAS)
    print(f"linear_regression: max |w - w_true| = {err_w:.2e}, "
          f"|b - b_true| = {err_b:.2e}")
