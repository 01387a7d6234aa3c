"""MLP classifier on interleaved spirals: the default job of `scripts/start_cluster.sh`.

Five spiral arms, each a class, wind two full turns around the origin of a plane. The
plane is hidden inside 32 dimensions by a fixed random rotation, and the other 30
directions carry small noise, so a linear model scores little better than chance (~25%)
while a 4-layer MLP climbs past 90% within about ten epochs. That visible climb is what
makes it a good first run: if accuracy stalls near 20%, gradients are being lost.

Every worker imports this file; worker 0 calls `finish` with the trained parameters.
Invariant: the data comes from a private `torch.Generator`, so it is byte-identical on
every worker whatever seed the run uses for the model.
"""
import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

NUM_CLASSES = 5        # spiral arms
NUM_SAMPLES = 8192     # 32 steps per epoch at BATCH_SIZE 256
INPUT_DIM = 32         # 2 informative directions + 30 of noise, mixed by a rotation
HIDDEN = 256           # 3 hidden layers of 256: ~141k parameters
TURNS = 2.0            # how often each arm winds round; 2 is hard for a linear model
ANGLE_JITTER = 0.1     # radians of noise along each arm, so arms are not ideal curves
NOISE_STD = 0.1        # noise in the 30 uninformative directions
SCALE = 3.0            # brings inputs to roughly unit scale for the first layer
DATA_SEED = 7          # private generator seed: same data on every worker

OPTIMIZER = {"name": "adam", "lr": 2e-3}
BATCH_SIZE = 256       # global batch per step; 128 per worker with two workers
EPOCHS = 20            # 640 steps; accuracy passes 90% around epoch 8-10
SHUFFLE = True


def build_model() -> nn.Module:
    """A plain ReLU MLP, 32 -> 256 -> 256 -> 256 -> 5 logits. No BatchNorm: no buffers."""
    return nn.Sequential(
        nn.Linear(INPUT_DIM, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, NUM_CLASSES),
    )


def _spirals():
    """Return (x (n, 32) float32, labels (n,) int64) for the spiral data set."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    labels = torch.arange(NUM_SAMPLES) % NUM_CLASSES                 # balanced classes
    t = torch.rand(NUM_SAMPLES, generator=gen)                       # position along arm
    radius = 0.1 + t                                                 # keep arms off 0
    angle = 2 * math.pi * (labels.float() / NUM_CLASSES + TURNS * t)
    angle = angle + ANGLE_JITTER * torch.randn(NUM_SAMPLES, generator=gen)
    plane = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)  # (n, 2)
    noise = NOISE_STD * torch.randn(NUM_SAMPLES, INPUT_DIM - 2, generator=gen)
    x = torch.cat([plane, noise], dim=1)                             # (n, 32)
    # A random orthogonal matrix spreads the plane over all 32 inputs, so no single
    # input feature reveals the class on its own.
    rotation, _ = torch.linalg.qr(torch.randn(INPUT_DIM, INPUT_DIM, generator=gen))
    return SCALE * x @ rotation, labels


def build_dataset() -> TensorDataset:
    """Map-style data set of (x (32,) float32, label () int64) pairs."""
    return TensorDataset(*_spirals())


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of a collated batch [X (b, 32), Y (b,)]."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def finish(model: nn.Module) -> None:
    """Print the trained model's accuracy over the whole data set."""
    x, y = _spirals()
    accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    print(f"mlp_classifier: accuracy {accuracy:.1%} on {len(y)} samples "
          f"(chance {1 / NUM_CLASSES:.0%})")
