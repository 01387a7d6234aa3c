"""A tiny regression MLP for the oracle tests: fixed data, no shuffling.

The optimizer comes from the environment (``TINY_MLP_OPTIMIZER``, JSON) so one job
file serves every optimizer the oracle tests cover; every worker inherits the
launcher's environment, so all of them see the same setting.
"""
import json
import math
import os
import time

import torch
from torch import nn

OPTIMIZER = json.loads(os.environ.get("TINY_MLP_OPTIMIZER", '{"name": "sgd", "lr": 0.05, "momentum": 0.9}'))
BATCH_SIZE = int(os.environ.get("TINY_MLP_BATCH", "24"))
SHUFFLE = os.environ.get("TINY_MLP_SHUFFLE", "0") == "1"
DELAY_S = float(os.environ.get("TINY_MLP_DELAY_S", "0"))   # fault tests: seconds per 8 samples
                                                           # (a task, with 3 workers), so a pass
                                                           # over fused tasks takes theirs together


if os.environ.get("TINY_MLP_GROUPS"):   # JSON: {"decay": overrides, "nodecay": overrides}
    _GROUPS = json.loads(os.environ["TINY_MLP_GROUPS"])

    def param_groups(model):
        """nanoGPT's split: the 2-D weights in one group, the biases in the other."""
        return [{"params": [n for n, p in model.named_parameters() if p.dim() >= 2],
                 **_GROUPS["decay"]},
                {"params": [n for n, p in model.named_parameters() if p.dim() < 2],
                 **_GROUPS["nodecay"]}]


if os.environ.get("TINY_MLP_CLIP"):     # clip_grad_norm_'s bound (the recipe tests)
    CLIP_GRAD_NORM = float(os.environ["TINY_MLP_CLIP"])

if os.environ.get("TINY_MLP_SCHEDULE"):  # JSON [warmup, decay_steps, min_ratio]: warmup + cosine
    _WARMUP, _DECAY, _MIN = json.loads(os.environ["TINY_MLP_SCHEDULE"])

    def lr_at(step):
        """nanoGPT's get_lr: linear warmup, cosine decay to min_ratio * lr, then flat."""
        top = OPTIMIZER["lr"]
        if step < _WARMUP:
            return top * (step + 1) / (_WARMUP + 1)
        if step > _DECAY:
            return top * _MIN
        ratio = (step - _WARMUP) / max(1, _DECAY - _WARMUP)
        return top * _MIN + 0.5 * (1 + math.cos(math.pi * ratio)) * (top - top * _MIN)


def build_model():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def build_dataset():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(200, 6, generator=g)                          # (200, 6)
    y = torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin(), x[:, 3:].sum(1)], 1)   # (200, 3)
    return torch.utils.data.TensorDataset(x, y)


def loss_fn(model, batch):
    x, y = batch
    if DELAY_S:
        time.sleep(DELAY_S * len(x) / 8)
    return nn.functional.mse_loss(model(x), y)
