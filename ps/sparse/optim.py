"""Per-row optimizers with torch's sparse semantics: the rows a step touched are updated
in place, their state beside them (``ps.sparse``)."""
from __future__ import annotations

import math

import numpy as np

OPTIMIZERS = {"sgd": {"lr"}, "adagrad": {"lr", "lr_decay", "eps", "initial_accumulator_value"},
              "adam": {"lr", "betas", "eps"}}


class RowOptimizer:
    """Updates rows present in a step, in place; state arrays grow with the table."""
    state_names: tuple[str, ...] = ()

    def update(self, rows: np.ndarray, state: dict, grad: np.ndarray, step: int) -> None:
        raise NotImplementedError


class RowSGD(RowOptimizer):
    def __init__(self, lr):
        self.lr = np.float32(lr)

    def update(self, rows, state, grad, step):
        rows -= self.lr * grad


class RowAdagrad(RowOptimizer):
    """torch.optim.Adagrad's sparse path: sum += g², p -= clr g / (sqrt(sum) + eps)."""
    state_names = ("sum",)

    def __init__(self, lr=0.01, lr_decay=0.0, eps=1e-10, initial_accumulator_value=0.0):
        self.lr, self.lr_decay, self.eps = lr, lr_decay, np.float32(eps)
        self.initial = np.float32(initial_accumulator_value)

    def update(self, rows, state, grad, step):
        clr = self.lr / (1 + (step - 1) * self.lr_decay)
        total = state["sum"]
        total += grad * grad
        std = np.sqrt(total) + self.eps
        rows += np.float32(-clr) * (grad / std)


class RowAdam(RowOptimizer):
    """torch.optim.SparseAdam: lazy moments, bias correction by the table's step count."""
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, np.float32(eps)

    def update(self, rows, state, grad, step):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m_update = (grad - m) * np.float32(1 - self.beta1)
        v_update = (grad * grad - v) * np.float32(1 - self.beta2)
        numer = m_update + m
        denom_sq = v_update + v
        m += m_update
        v += v_update
        denom = np.sqrt(denom_sq) + self.eps
        step_size = self.lr * math.sqrt(1 - self.beta2 ** step) / (1 - self.beta1 ** step)
        rows += np.float32(-step_size) * (numer / denom)


def make_row_optimizer(config: dict, dim: int) -> RowOptimizer:
    args = {k: v for k, v in config.items() if k != "name"}
    for key, value in args.items():
        ok = (isinstance(value, (list, tuple)) and len(value) == 2 and key == "betas"
              and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in value)) or (
            key != "betas" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0 <= value < math.inf)
        if not ok:
            raise ValueError(f"bad {config['name']} argument {key}={value!r}")
    return {"sgd": RowSGD, "adagrad": RowAdagrad, "adam": RowAdam}[config["name"]](**args)
