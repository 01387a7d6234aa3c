"""Straggler and crash emulation, for experiments and tests.

``--slow F`` makes every task of this worker take F times as long, by sleeping
(F - 1) times its measured compute; ``--jitter P:F`` makes any task F times slower
with probability P. The draw is seeded by (seed, task id), so a task is slow no
matter which worker computes it and every run sees the same slow tasks.

``--crash-at POINT@STEP`` kills this worker with SIGKILL at a precise point of step
STEP: ``before_push``, ``mid_push`` (after shard 0 has taken the push, before the
others: the partial push a crash can leave), ``after_sparse_push`` (its sparse tables
have the step's rows, its dense shards nothing) or ``after_push``; ``stall@STEP`` instead
stops the worker's main thread for STALL_S before its push of STEP (its heartbeats go
on: a stuck worker that is not dead, which the others wait for by name). Faults land
where the test says, not where a timer happens to fall.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np


class Slowdown:
    def __init__(self, slow: float = 1.0, jitter: tuple[float, float] = (0.0, 1.0), seed: int = 0):
        if slow < 1.0 or jitter[1] < 1.0 or not 0.0 <= jitter[0] <= 1.0:
            raise ValueError("slow factors must be >= 1 and jitter probability in [0, 1]")
        self.slow, self.jitter, self.seed = slow, jitter, seed

    @property
    def active(self) -> bool:
        """Does any task sleep? (--slow or --jitter given)"""
        return self.slow > 1.0 or (self.jitter[0] > 0 and self.jitter[1] > 1.0)

    def factor(self, task_id: int) -> float:
        p, f = self.jitter
        if p > 0 and np.random.default_rng([self.seed, task_id]).random() < p:
            return self.slow * f
        return self.slow

    def after(self, task_id: int, compute_s: float) -> None:
        """Sleep so that the task took factor x its real compute time."""
        extra = (self.factor(task_id) - 1.0) * compute_s
        if extra > 0:
            time.sleep(extra)


def parse_jitter(text: str) -> tuple[float, float]:
    """'0.2:3' -> (0.2, 3.0)."""
    try:
        p, f = text.split(":")
        return float(p), float(f)
    except ValueError:
        raise ValueError(f"--jitter wants P:F, e.g. 0.2:3, not {text!r}") from None


STALL_S = 4.0       # the stall@STEP hook: longer than a few heartbeats, shorter than a deadline


class CrashAt:
    POINTS = ("before_push", "mid_push", "after_sparse_push", "after_push", "stall")

    def __init__(self, point: str | None = None, step: int = -1):
        self.point, self.step = point, step

    @classmethod
    def parse(cls, text: str | None) -> "CrashAt":
        if not text:
            return cls()
        point, _, step = text.partition("@")
        if point not in cls.POINTS or not step.isdigit():
            raise ValueError(f"--crash-at wants POINT@STEP with POINT in {cls.POINTS}, not {text!r}")
        return cls(point, int(step))

    def at(self, point: str, step: int) -> bool:
        return self.point == point and self.step == step

    def maybe(self, point: str, step: int) -> None:
        if self.at(point, step):
            self.now()
        if point == "before_push" and self.at("stall", step):
            time.sleep(STALL_S)

    @staticmethod
    def now() -> None:
        os.kill(os.getpid(), signal.SIGKILL)
