"""A worker's settings (``python -m worker --help`` sets them) and its device."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WorkerConfig:
    scheduler: str                  # the scheduler's endpoint
    job: str                        # path of the job file
    worker_id: int = -1             # -1: the scheduler assigns one
    device: str = "auto"            # auto | cpu | cuda
    seed: int = 0                   # must equal the scheduler's
    out: str | None = None          # the finisher writes params.npz here
    threads: int = 0                # torch intra-op threads (0: torch's default)
    timeout_s: float = 120.0        # deadline of every request
    slow: float = 1.0               # straggler emulation: every task this many times slower
    jitter: tuple = (0.0, 1.0)      # (P, F): any task F times slower with probability P
    trace: bool = False             # write trace/worker<id>-<incarnation>.json into out
    crash_at: str | None = None     # fault hook "POINT@STEP": kill this process right there
    secure: str | None = None       # key directory: CurveZMQ as key worker<id> (ps.security.curve)
    grad_dtype: str = "float32"     # gradients on the wire: float32 | float16 | bfloat16
    param_dtype: str = "float32"    # parameters on the wire (servers keep float32 either way)
    prefetch: str = "push"          # when the next pull is sent: push | compute (not BSP) | off
    overlap: bool = False           # BSP on the CPU: push shards from backward (worker.speedups.overlap);
                                    # opt-in: 1,440 vs 1,441 samples/s with and without on 2 cores
    fuse: int = 0                   # BSP/SSP: most tasks per pass (0: no limit; Dealer.take_more)
    staged_buffers: bool = False    # separate host and device buffers on the CPU too (FlatModel)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    return torch.device(name)
