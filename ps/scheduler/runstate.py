"""Run accounting kept by the scheduler: losses per step, work per worker, wall time.

Pure bookkeeping, fed by workers' REPORT and DONE messages; it answers STATUS
(the launcher's live progress line), names who is missing when a deadline passes,
and becomes the body of ``summary.json``.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass


@dataclass
class WorkerTally:
    samples: int = 0
    tasks: int = 0
    pushes: int = 0               # reports of pushes with samples (async DiLoCo: its rounds)
    compute_s: float = 0.0
    wait_s: float = 0.0
    step: int = -1                # last step (or clock) this worker reported
    done: bool = False
    dead: bool = False            # declared dead (until a replacement takes its id)


class RunState:
    def __init__(self, steps: int, num_workers: int, steps_per_epoch: int):
        self.steps = steps
        self.steps_per_epoch = steps_per_epoch
        self.workers = [WorkerTally() for _ in range(num_workers)]
        self.loss_sum: dict[int, float] = defaultdict(float)     # step -> sum of sample losses
        self.loss_samples: dict[int, int] = defaultdict(int)     # step -> samples behind it
        self.epochs: dict[int, dict] = {}    # epoch -> samples applied, duplicates rejected
        self.counted: set[int] = set()       # task ids whose samples are in the tally
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.moved: dict[tuple[int, int], tuple[int, int]] = {}   # (worker, inc) -> payload
                                                     # bytes (pushed, pulled) it last reported

    def started(self) -> bool:
        """The first lease starts the run's clock; True that once (the scheduler journals it)."""
        if self.t_start is None:
            self.t_start = time.monotonic()
            return True
        return False

    def report(self, worker: int, step: int, tasks: int, samples: int, loss_sum: float,
               compute_s: float, wait_s: float) -> None:
        tally = self.workers[worker]
        tally.samples += samples
        tally.tasks += tasks
        tally.compute_s += compute_s
        tally.wait_s += wait_s
        tally.step = max(tally.step, step)
        tally.pushes += bool(samples)
        if samples:
            self.loss_sum[step] += loss_sum
            self.loss_samples[step] += samples

    def note_bytes(self, worker: int, inc: int, pushed: int, pulled: int) -> None:
        """A worker incarnation's byte counters (cumulative: the largest is kept)."""
        old = self.moved.get((worker, inc), (0, 0))
        self.moved[(worker, inc)] = (max(old[0], pushed), max(old[1], pulled))

    def bytes_moved(self, worker: int) -> tuple[int, int]:
        """(pushed, pulled) payload bytes of ``worker``, its incarnations summed."""
        mine = [v for (w, _), v in self.moved.items() if w == worker]
        return sum(p for p, _ in mine), sum(q for _, q in mine)

    def count_tasks(self, plan, ids, rejected=()) -> None:
        """Count tasks by id (``plan``, a TaskPlan, says their step and samples; the ids
        were checked first, ``TaskPlan.valid_ids``)."""
        for tid in ids:
            step = tid // plan.tasks_per_step
            self.count_task(tid, step // plan.steps_per_epoch, plan.task_size(tid), tid in rejected)

    def count_task(self, task_id: int, epoch: int, samples: int, rejected: bool) -> None:
        """A task's push came back. Its samples count once, the first time it is known to
        be applied on every shard; a push that every shard refused (it already had the
        task) counts as a duplicate. A task pushed, then dealt again because its worker
        died before reporting, is refused on the second push: that is when it counts."""
        tally = self.epochs.setdefault(epoch, {"epoch": epoch, "samples_applied": 0,
                                               "duplicates_rejected": 0})
        if rejected:
            tally["duplicates_rejected"] += 1
        if task_id not in self.counted:
            self.counted.add(task_id)
            tally["samples_applied"] += samples

    def done(self, worker: int) -> None:
        self.workers[worker].done = True

    def all_done(self) -> bool:
        """Every live worker is done (the dead are not waited for)."""
        return all(w.done or w.dead for w in self.workers) and not all(w.dead for w in self.workers)

    def mark_dead(self, worker: int) -> None:
        self.workers[worker].dead = True

    def revive(self, worker: int) -> None:
        self.workers[worker].dead = False
        self.workers[worker].done = False

    def finish(self) -> None:
        self.t_end = time.monotonic()

    def elapsed(self) -> float:
        if self.t_start is None:
            return 0.0
        return (self.t_end or time.monotonic()) - self.t_start

    def samples(self) -> int:
        return sum(w.samples for w in self.workers)

    def losses(self) -> list[float]:
        return [self.loss_sum[s] / self.loss_samples[s] for s in sorted(self.loss_samples)]

    def last_loss(self) -> float | None:
        if not self.loss_samples:
            return None
        last = max(self.loss_samples)
        return self.loss_sum[last] / self.loss_samples[last]

    def progress(self) -> dict:
        elapsed = self.elapsed()
        return {"step": 1 + max((w.step for w in self.workers), default=-1), "steps": self.steps,
                "loss": self.last_loss(), "samples": self.samples(),
                "samples_per_s": self.samples() / elapsed if elapsed > 0 else 0.0,
                "elapsed_s": elapsed, "workers_done": sum(w.done for w in self.workers)}

    def diagnose(self) -> str:
        """Who is behind: each unfinished worker and the last step it reported."""
        behind = [f"worker {i} (last reported step {w.step})"
                  for i, w in enumerate(self.workers) if not w.done and not w.dead]
        return ", ".join(behind) or "nobody (all workers done)"

    def summary(self, stolen_by: list[int], stolen_from: list[int]) -> dict:
        """The run's part of summary.json. A worker's idle_s is the run's wall time
        minus its compute time: waiting on transfers, gates, leases and the others."""
        elapsed = self.elapsed()
        per_worker = [{"worker": i, **asdict(w), "stolen_by": stolen_by[i],
                       "stolen_from": stolen_from[i], "idle_s": max(0.0, elapsed - w.compute_s),
                       "bytes_pushed": self.bytes_moved(i)[0], "bytes_pulled": self.bytes_moved(i)[1]}
                      for i, w in enumerate(self.workers)]
        return {"steps": self.steps, "epochs": self.steps / self.steps_per_epoch,
                "samples": self.samples(), "final_loss": self.last_loss(),
                "wall_s": elapsed,
                "samples_per_s": self.samples() / elapsed if elapsed > 0 else 0.0,
                "losses": self.losses(), "per_worker": per_worker,
                "bytes_pushed": sum(w["bytes_pushed"] for w in per_worker),
                "bytes_pulled": sum(w["bytes_pulled"] for w in per_worker),
                "per_epoch": [self.epochs[e] for e in sorted(self.epochs)]}
