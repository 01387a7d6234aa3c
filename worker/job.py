"""Jobs: the Python file every worker imports, and what the framework takes from it.

A job file defines::

    build_model() -> torch.nn.Module        # float32 parameters
    build_dataset() -> Dataset              # map-style: len() and [i]
    loss_fn(model, batch) -> Tensor         # MEAN loss of a default-collated batch; never
                                            # touches .grad (no model.zero_grad())
    OPTIMIZER = {"name": "adam", "lr": 1e-3}   # torch's argument names
    BATCH_SIZE = 64                         # the global batch of one step
    SHUFFLE = True                          # optional; False: step k uses samples [kB, (k+1)B)
    EPOCHS = 1                              # optional; how long a plain run trains
    def finish(model): ...                  # optional; the finishing worker calls it with the final parameters

``build`` seeds torch with the run's seed before ``build_model`` (so every worker,
and the single-process oracle, starts from the same parameters) and again before
``build_dataset``.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch
from torch.utils.data import default_collate

from ps.core.optim import make_optimizer

REQUIRED = ("build_model", "build_dataset", "loss_fn", "OPTIMIZER", "BATCH_SIZE")


@dataclass
class Job:
    path: str
    module: ModuleType
    optimizer: dict
    batch_size: int
    shuffle: bool
    epochs: int | None
    finish: Callable | None

    def build(self, seed: int) -> tuple[torch.nn.Module, torch.utils.data.Dataset]:
        torch.manual_seed(seed)
        model = self.module.build_model()
        torch.manual_seed(seed)
        dataset = self.module.build_dataset()
        return model, dataset

    def loss(self, model, batch) -> torch.Tensor:
        return self.module.loss_fn(model, batch)


def load_job(path: str) -> Job:
    """Import a job file and check it defines what a job must."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"job file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"ps_job_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [name for name in REQUIRED if not hasattr(module, name)]
    if missing:
        raise ValueError(f"job {path} does not define {', '.join(missing)}")
    optimizer = dict(module.OPTIMIZER)
    try:
        make_optimizer(optimizer, 1)      # fail here, not later on every server
    except (ValueError, TypeError) as exc:
        raise ValueError(f"job {path}: OPTIMIZER {optimizer}: {exc}") from None
    batch_size = int(module.BATCH_SIZE)
    if batch_size < 1:
        raise ValueError(f"job {path}: BATCH_SIZE must be >= 1")
    epochs = getattr(module, "EPOCHS", None)
    if epochs is not None and int(epochs) < 1:
        raise ValueError(f"job {path}: EPOCHS must be >= 1 (or absent)")
    return Job(path, module, optimizer, batch_size, bool(getattr(module, "SHUFFLE", True)),
               int(epochs) if epochs is not None else None, getattr(module, "finish", None))


def collate(dataset, indices, device: torch.device):
    """Gather samples by id, collate them as torch's DataLoader would, move to device."""
    batch = default_collate([dataset[i] for i in indices])
    return _to(batch, device)


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch
