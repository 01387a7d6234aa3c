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
    def param_groups(model): ...            # optional; torch-style groups whose "params" are
                                            # parameter NAMES, each group overriding OPTIMIZER
                                            # keys (weight_decay on 2-D weights only, say)
    def lr_at(step): ...                    # optional; the learning rate of update `step`
                                            # (from 0), replacing OPTIMIZER["lr"]
    CLIP_GRAD_NORM = 1.0                    # optional; clip_grad_norm_ to this global L2 norm
    AUTOCAST = "bfloat16"                   # optional; the forward pass under torch.autocast
    OUTER_OPTIMIZER = {...}                 # optional; --mode diloco: the servers' optimizer
                                            # (default DEFAULT_OUTER: Nesterov SGD, lr 0.7)

``param_groups`` must put every parameter in exactly one group; the worker sends the
groups as ranges of the flat vector (``flat_groups``), and every server steps each range
it holds with its group's hyperparameters (``ps.core.param_groups.Grouped``).

``lr_at`` is a schedule: BSP's update ``step`` is the global step; an SSP or ASP shard's is
its version (its count of updates). The servers run no job code, so each worker sends
them the table of ``lr_at`` over the run's versions (``lr_table``) as it starts; a group
with its own lr is scaled by ``lr_at(step) / OPTIMIZER["lr"]``, as torch's LambdaLR
scales every group. ``CLIP_GRAD_NORM`` clips the step's whole mean gradient in BSP (the
shards agree on its norm: ``ps.scheduler.norms``) and each push's own in SSP and ASP
(``worker.runner``). With ``AUTOCAST`` the loss's forward pass runs in bfloat16 where
torch allows it; the parameters, gradients and the servers' state stay float32.

``build`` seeds torch with the run's seed before ``build_model`` (so every worker,
and the single-process oracle, starts from the same parameters) and again before
``build_dataset``.

An exception raised by the job's own code (the file's top level, ``build_model``,
``build_dataset``, indexing the dataset, ``loss_fn`` and its backward pass,
``finish``) comes out as ``JobError``: a bug in the job, which every worker would
meet again, so the run stops on it (``worker/__main__.py`` tells the scheduler),
unlike a crashed or lost process, which the run survives. It names the function and
the job file's line nearest the error, and keeps the traceback from the job's code
down.
"""
from __future__ import annotations

import importlib.util
import math
import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import numpy as np
import torch
from torch.utils.data import default_collate

from ps.core.optim import make_optimizer
from ps.wire.client import NoReply, RemoteError
from ps.wire.protocol import MAX_JOB_ERROR_CHARS
from worker.heartbeat import Fenced, SchedulerLost

REQUIRED = ("build_model", "build_dataset", "loss_fn", "OPTIMIZER", "BATCH_SIZE")
CLUSTER_ERRORS = (RemoteError, NoReply, Fenced, SchedulerLost)   # not the job's: see running
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}   # float16 would need a loss scaler as well
DEFAULT_OUTER = {"name": "sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True}   # DiLoCo's


class JobError(Exception):
    """The job's own code raised: ``function`` (``ps.wire.protocol.JOB_FUNCTIONS``),
    ``location`` (``path:line``), ``error`` (``Type: message``) and ``traceback``."""

    def __init__(self, function: str, location: str, error: str, trace: str):
        super().__init__(f"job error in {function} ({location}): {error}")
        self.function, self.location, self.error = function, location, error
        self.traceback = trace


@contextmanager
def running(path: str, function: str, module: ModuleType | None = None):
    """Run a piece of the job file's code: any exception it raises becomes a JobError,
    except the framework's own raised through it (a sparse table's pull inside the job's
    forward: refused, unanswered, or this worker fenced), which pass on as they are."""
    try:
        yield
    except (JobError, *CLUSTER_ERRORS):
        raise
    except Exception as exc:
        raise job_error(path, function, exc, module) from exc


def job_error(path: str, function: str, exc: Exception, module: ModuleType | None) -> JobError:
    """The JobError for ``exc``: located at the deepest frame in the job file (else at the
    ``def`` of the function, or for the dataset of ``build_dataset``), its traceback from
    the first such frame down."""
    path = os.path.abspath(path)
    frames = list(traceback.walk_tb(exc.__traceback__))
    ours = [i for i, (frame, _) in enumerate(frames)
            if os.path.abspath(frame.f_code.co_filename) == path]        # the job file's frames
    defined = "build_dataset" if function == "dataset" else function
    code = getattr(getattr(module, defined, None), "__code__", None)
    line = frames[ours[-1]][1] if ours else (code.co_firstlineno if code else None)
    tb = exc.__traceback__
    for _ in range(ours[0] if ours else 1):          # skip the framework's frames above the job's
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    if isinstance(exc, SyntaxError) and exc.filename and os.path.abspath(exc.filename) == path:
        line, tb = exc.lineno, None                  # the file did not compile: no frame is its
    shown = os.path.relpath(path)
    shown = path if shown.startswith("..") else shown      # relative to here, if below here
    location = f"{shown}:{line}" if line else shown
    error = f"{type(exc).__name__}: {exc}"
    return JobError(function, location[:MAX_JOB_ERROR_CHARS], error[:MAX_JOB_ERROR_CHARS],
                    "".join(traceback.format_exception(type(exc), exc, tb)))


@dataclass
class Job:
    path: str
    module: ModuleType
    optimizer: dict
    batch_size: int
    shuffle: bool
    epochs: int | None
    finish: Callable | None
    lr_at: Callable | None = None
    clip: float | None = None            # CLIP_GRAD_NORM
    autocast: str | None = None          # AUTOCAST
    outer_optimizer: dict | None = None  # OUTER_OPTIMIZER (DiLoCo), DEFAULT_OUTER if absent

    def build(self, seed: int) -> tuple[torch.nn.Module, torch.utils.data.Dataset]:
        torch.manual_seed(seed)
        with self.running("build_model"):
            model = self.module.build_model()
        torch.manual_seed(seed)
        with self.running("build_dataset"):
            dataset = self.module.build_dataset()
        return model, dataset

    def loss(self, model, batch) -> torch.Tensor:
        """The job's mean loss of a batch; its forward pass under autocast if the job asks
        (the backward of the returned loss then runs in the dtypes autocast chose)."""
        device = next(model.parameters()).device.type
        with self.running("loss_fn"), torch.autocast(
                device, dtype=AUTOCAST_DTYPES.get(self.autocast), enabled=self.autocast is not None):
            return self.module.loss_fn(model, batch)

    def lr_table(self, versions: int) -> np.ndarray:
        """``lr_at(v)`` for every version of the run, (versions,) float64: what the servers
        are sent. A rate that is NaN, infinite or negative is a job error naming it."""
        rates = np.empty(versions, np.float64)
        with self.running("lr_at"):
            for v in range(versions):
                lr = self.lr_at(v)
                if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0 \
                        or math.isinf(lr):
                    raise ValueError(f"lr_at({v}) = {lr!r}: a learning rate must be a finite "
                                     "number >= 0")
                rates[v] = lr
        return rates

    def running(self, function: str):
        """``with job.running("loss_fn"): ...``: the job's exceptions become JobError."""
        return running(self.path, function, self.module)

    def param_groups(self, model: torch.nn.Module) -> list | None:
        """The job's ``param_groups(model)`` as ranges of the flat vector, ``[[lo, hi,
        overrides], ...]`` covering it in ``named_parameters`` order (None without one).
        A name missing, repeated or unknown, or an override the optimizer refuses, is a
        job error naming it."""
        if not hasattr(self.module, "param_groups"):
            return None
        with self.running("param_groups"):
            return flat_groups(self.module.param_groups(model), model, self.optimizer)


def load_job(path: str) -> Job:
    """Import a job file and check it defines what a job must."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"job file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"ps_job_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    with running(path, "<module>"):
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
    clip = getattr(module, "CLIP_GRAD_NORM", None)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                             or not 0 < clip < math.inf):
        raise ValueError(f"job {path}: CLIP_GRAD_NORM must be a finite number > 0 (or absent), "
                         f"not {clip!r}")
    autocast = getattr(module, "AUTOCAST", None)
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"job {path}: AUTOCAST must be one of {sorted(AUTOCAST_DTYPES)} or None, "
                         f"not {autocast!r}")
    lr_at = getattr(module, "lr_at", None)
    if lr_at is not None and not callable(lr_at):
        raise ValueError(f"job {path}: lr_at must be a function of the step")
    outer = dict(getattr(module, "OUTER_OPTIMIZER", DEFAULT_OUTER))
    try:
        make_optimizer(outer, 1)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"job {path}: OUTER_OPTIMIZER {outer}: {exc}") from None
    return Job(path, module, optimizer, batch_size, bool(getattr(module, "SHUFFLE", True)),
               int(epochs) if epochs is not None else None, getattr(module, "finish", None),
               lr_at, float(clip) if clip is not None else None, autocast, outer)


def flat_groups(groups, model: torch.nn.Module, optimizer: dict) -> list:
    """Torch-style groups of parameter NAMES -> ``[[lo, hi, overrides], ...]`` ranges of the
    flat vector (worker/flat.py's layout), neighbours of one group merged."""
    if not (isinstance(groups, (list, tuple)) and groups
            and all(isinstance(g, dict) and isinstance(g.get("params"), (list, tuple))
                    for g in groups)):
        raise ValueError("param_groups must return a list of dicts, each with a 'params' "
                         "list of parameter names")
    owner: dict[str, int] = {}
    names = [name for name, _ in model.named_parameters()]
    for k, group in enumerate(groups):
        for name in group["params"]:
            if name not in names:
                raise ValueError(f"param_groups: {name!r} is not a parameter of the model")
            if name in owner:
                raise ValueError(f"param_groups: {name!r} is in groups {owner[name]} and {k}")
            owner[name] = k
        overrides = {key: value for key, value in group.items() if key != "params"}
        try:
            make_optimizer({**optimizer, **overrides}, 1)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"param_groups: group {k} {overrides}: {exc}") from None
    missing = [name for name in names if name not in owner]
    if missing:
        raise ValueError(f"param_groups: {missing[0]!r} is in no group"
                         + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
    ranges, lo = [], 0
    for name, p in model.named_parameters():
        k, hi = owner[name], lo + p.numel()
        if ranges and ranges[-1][2] == k and ranges[-1][1] == lo:
            ranges[-1][1] = hi                          # the same group as its neighbour
        elif hi > lo:
            ranges.append([lo, hi, k])
        lo = hi
    return [[a, b, {key: value for key, value in groups[k].items() if key != "params"}]
            for a, b, k in ranges]


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
