"""Tasks: cutting epochs into micro-batches and dealing them to workers.

The data stream is a sequence of global batches ("steps"): step k of epoch e takes
samples ``order[k*B : (k+1)*B]`` of that epoch's order, the last batch of an epoch
possibly smaller (as torch's DataLoader gives it). Each step is cut into tasks of
nearly equal size; a task is the unit that is leased, computed, pushed and
de-duplicated. Task ids are unique in the run: ``step * tasks_per_step + j``, where
``tasks_per_step`` is the finest cut a step may get; the dealer may cut a step into fewer
tasks (its *grain*, ``TaskPlan.grain``), and then uses the first ids of the step.

``ps.core.dealer`` deals these tasks to workers and lets idle workers steal them.
Everything here is pure and replayable: the same seed gives the same tasks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def epoch_order(num_samples: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The order of sample ids in one epoch: identity, or a permutation of (seed, epoch)."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)


@dataclass(frozen=True)
class Task:
    id: int
    step: int
    samples: tuple[int, ...]

    def to_wire(self) -> list:
        return [self.id, self.step, list(self.samples)]


@dataclass
class TaskPlan:
    """Which samples every step and task covers. Deterministic in (seed, epoch) and in
    the grain each step was dealt with."""
    num_samples: int
    batch_size: int
    tasks_per_step: int                 # the most tasks a step is cut into: the ids' stride
    seed: int = 0
    shuffle: bool = True
    grain: dict = field(default_factory=dict)   # step -> tasks it is cut into, where the
                                                # dealer chose fewer than tasks_per_step
    _orders: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_samples < 1 or self.batch_size < 1 or self.tasks_per_step < 1:
            raise ValueError("num_samples, batch_size and tasks_per_step must be positive")
        self.steps_per_epoch = steps_per_epoch(self.num_samples, self.batch_size)

    def batch(self, step: int) -> np.ndarray:
        """Sample ids of global step ``step`` (counting across epochs)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.num_samples, epoch, self.seed, self.shuffle)}
        return self._orders[epoch][k * self.batch_size:(k + 1) * self.batch_size]

    def batch_len(self, step: int) -> int:
        """Samples in step ``step``'s batch (the last of an epoch may be short)."""
        k = step % self.steps_per_epoch
        return min(self.batch_size, self.num_samples - k * self.batch_size)

    def num_tasks(self, step: int) -> int:
        return min(self.grain.get(step, self.tasks_per_step), self.batch_len(step))

    def set_grain(self, step: int, tasks: int) -> None:
        """Cut step ``step`` into ``tasks`` tasks (1 .. tasks_per_step), before any is dealt."""
        if not 1 <= tasks <= self.tasks_per_step:
            raise ValueError(f"a step is cut into 1 .. {self.tasks_per_step} tasks, not {tasks}")
        if tasks == self.tasks_per_step:
            self.grain.pop(step, None)
        else:
            self.grain[step] = tasks

    def task_size(self, task_id: int) -> int | None:
        """Samples in task ``task_id`` without cutting its step (``tasks`` splits a batch of
        n into k parts, the first n % k one larger); None for an id no step has."""
        step, j = divmod(task_id, self.tasks_per_step)
        if step < 0:
            return None
        n, k = self.batch_len(step), self.num_tasks(step)
        return n // k + (j < n % k) if j < k else None

    def valid_ids(self, ids, steps: int) -> bool:
        """Every id names a task of one of the run's ``steps`` steps."""
        return all(self.task_size(tid) is not None and tid // self.tasks_per_step < steps
                   for tid in ids)

    def ids(self, step: int) -> list[int]:
        """The task ids of step ``step``, without cutting its batch."""
        return [step * self.tasks_per_step + j for j in range(self.num_tasks(step))]

    def tasks(self, step: int) -> list[Task]:
        """The step's batch cut into ``num_tasks(step)`` non-empty tasks."""
        parts = np.array_split(self.batch(step), self.num_tasks(step))
        return [Task(tid, step, tuple(int(i) for i in part))
                for tid, part in zip(self.ids(step), parts)]

