"""Tasks: cutting epochs into micro-batches and dealing them to workers.

The data stream is a sequence of global batches ("steps"): step k of epoch e takes
samples ``order[k*B : (k+1)*B]`` of that epoch's order, the last batch of an epoch
possibly smaller (as torch's DataLoader gives it). Each step is cut into tasks of
nearly equal size; a task is the unit that is leased, computed, pushed and
de-duplicated. Task ids are unique in the run: ``step * tasks_per_step + j``.

``Dealer`` holds one deque per worker for each step. A worker takes tasks from the
front of its own deque; every lease is recorded until its task completes. (Work
stealing takes from the back of another worker's deque; the deques are laid out
for it.) The scheduler owns the only Dealer; everything here is pure and replayable:
the same seed gives the same tasks.
"""
from __future__ import annotations

from collections import deque
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
        return [self.id, list(self.samples)]


@dataclass
class TaskPlan:
    """Which samples every step and task covers. Deterministic in (seed, epoch)."""
    num_samples: int
    batch_size: int
    tasks_per_step: int
    seed: int = 0
    shuffle: bool = True
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

    def tasks(self, step: int) -> list[Task]:
        """The step's batch cut into at most ``tasks_per_step`` non-empty tasks."""
        ids = self.batch(step)
        parts = np.array_split(ids, min(self.tasks_per_step, len(ids)))
        return [Task(step * self.tasks_per_step + j, step, tuple(int(i) for i in part))
                for j, part in enumerate(parts)]


class Dealer:
    """Per-step deques of tasks, one per worker, and the leases taken from them."""

    def __init__(self, plan: TaskPlan, num_workers: int):
        self.plan = plan
        self.num_workers = num_workers
        self.deques: dict[int, list[deque]] = {}      # step -> one deque per worker
        self.step_tasks: dict[int, int] = {}          # step -> number of tasks in it
        self.leases: dict[int, int] = {}              # task id -> worker holding it

    def deal(self, step: int) -> None:
        """Deal a step's tasks round-robin into the workers' deques (once per step)."""
        if step in self.deques:
            return
        tasks = self.plan.tasks(step)
        self.deques[step] = [deque(tasks[w::self.num_workers]) for w in range(self.num_workers)]
        self.step_tasks[step] = len(tasks)

    def take(self, worker: int, step: int) -> list[Task]:
        """Lease everything left in ``worker``'s own deque for ``step``."""
        self.deal(step)
        own = self.deques[step][worker]
        taken = list(own)
        own.clear()
        for task in taken:
            self.leases[task.id] = worker
        return taken

    def complete(self, task_ids: list[int]) -> None:
        """A lease ends when its task's gradient has been pushed."""
        for tid in task_ids:
            self.leases.pop(tid, None)

    def forget(self, step: int) -> None:
        """Drop a finished step's deques (the plan can always rebuild them)."""
        self.deques.pop(step, None)
