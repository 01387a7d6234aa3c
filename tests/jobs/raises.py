"""tiny_mlp with a bug in one of its functions, for the job error tests.

``RAISES_IN`` (environment, inherited by every worker) names the function that goes
wrong: build_model, build_dataset, loss_fn or finish (empty: none does). Each bug is
an ordinary one, on the line marked ``# raises: <function>``.
"""
import os

import torch
from torch import nn

OPTIMIZER = {"name": "sgd", "lr": 0.05}
BATCH_SIZE = 24
SHUFFLE = False
RAISES_IN = os.environ.get("RAISES_IN", "")


def build_model():
    hidden = "16" if RAISES_IN == "build_model" else 16
    return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(16, 3))  # raises: build_model


def build_dataset():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(200, 6, generator=g)                                     # (200, 6)
    y = torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin(), x[:, 3:].sum(1)], 1)  # (200, 3)
    if RAISES_IN == "build_dataset":
        y = y[:100]
    return torch.utils.data.TensorDataset(x, y)                              # raises: build_dataset


def loss_fn(model, batch):
    x, y = batch
    if RAISES_IN == "loss_fn":
        y = y[:, :2]                                    # the targets lose a column
    return (model(x) - y).pow(2).mean()                 # raises: loss_fn


def finish(model):
    if RAISES_IN == "finish":
        raise RuntimeError("cannot write the report")   # raises: finish
