"""Dealing tasks to workers, leasing them, and work stealing.

The scheduler deals each *round* of tasks into one deque per worker: a round is a
step in BSP, a clock in SSP (the same numbers) and an epoch in ASP. A worker takes
from the **front** of its own deque; a worker whose deque is empty **steals** from
the **back** of the most loaded deque, about half of what is left there (the Cilk
discipline: the owner and the thief work at opposite ends, so the thief takes the
work the owner would have reached last). Stolen tasks move into the thief's deque
of the same round and are taken from there.

Once the workers' speeds are measured, each task is dealt to the worker that would
finish it first, so stealing only corrects what changes; ``steal=False`` deals round-robin
in equal shares and never steals, the static baseline.

**The grain adapts** (``adaptive=True``, the scheduler's default unless --tasks-per-step
fixes it):
while the workers run at one speed, each step is cut into one task per live worker (one
forward and backward pass each, nothing to steal, no tail kept back); once their measured
speeds differ by more than IMBALANCE, steps are cut into the plan's finest grain
(``TaskPlan.tasks_per_step``), so that dealing by speed and stealing have pieces to move.

A lease lasts from ``take`` until ``complete`` (the task's gradient was pushed);
``leases`` says who holds what. ``take_more`` adds tasks of the same deque to a lease,
for the worker to compute in one pass, and leaves the deque's last task to a thief when
one would do it sooner. Pure logic: no sockets, no clocks.
"""
from __future__ import annotations

from collections import deque

from ps.core.tasks import Task, TaskPlan

SPEED_ALPHA = 0.2     # weight of a new speed measurement in the running average
PROBE_ROUNDS = 8      # a live worker dealt nothing PROBE_ROUNDS - 1 rounds running gets
                      # one task in the next
IMBALANCE = 1.25      # fastest / slowest measured speed above which rounds are cut finely
BALANCED = 1.10       # ... and below which they go back to one task per worker: the gap
                      # keeps two workers whose speeds wobble around 1.2 from flapping


def steal_count(left: int, thief_speed: float, owner_speed: float) -> int:
    """How many of the ``left`` tasks at the back of a deque the thief should take.

    The count that makes the pair finish soonest: the thief needs ``k / thief_speed``,
    the owner ``(left - k + 0.5) / owner_speed`` (the 0.5: on average half of the
    task it is computing remains). With equal speeds this is about half (Cilk's
    rule); a slow thief takes less, or nothing: a straggler must not steal the work
    a fast worker would have finished first.
    """
    def makespan(k: int) -> float:
        return max(k / thief_speed, (left - k + 0.5) / owner_speed)
    return min(range(left + 1), key=lambda k: (makespan(k), k))


class Dealer:
    def __init__(self, plan: TaskPlan, num_workers: int, total_steps: int,
                 per_epoch: bool = False, steal: bool = True, adaptive: bool = False,
                 steps_per_round: int = 1):
        self.plan = plan
        self.adaptive = adaptive               # choose each round's grain (see the docstring)
        self.fine = False                      # adaptive: the last round was cut finely
        self.fine_rounds = self.coarse_rounds = 0
        self.num_workers = num_workers
        self.total_steps = total_steps
        self.per_epoch = per_epoch             # ASP: a round is an epoch, not a step
        self.steps_per_round = plan.steps_per_epoch if per_epoch else steps_per_round
        # DiLoCo: a round is H steps, and part j of each is worker j's (its own trajectory)
        self.by_part = not per_epoch and steps_per_round > 1
        self.steal = steal
        self.deques: dict[int, list[deque]] = {}     # round -> one deque of Tasks per worker
        self.dealt: set[int] = set()                 # rounds dealt (emptied rounds leave deques)
        self.leases: dict[int, tuple[int, Task]] = {}  # task id -> (worker, task)
        self.speeds: list[float | None] = [None] * num_workers   # samples per compute second
        self.stolen_by = [0] * num_workers     # tasks each worker stole
        self.stolen_from = [0] * num_workers   # tasks stolen from each worker
        self.steal_log: list[tuple[int, int, int, int]] = []   # (thief, victim, round, tasks)
        self.gone: set[int] = set()            # dead workers: dealt nothing, stolen from by all
        self.redo: set[int] = set()            # ids of tasks dealt again after their holder died
        self.starved = [0] * num_workers       # rounds running each worker was dealt nothing

    # -- rounds ---------------------------------------------------------------------
    @property
    def rounds(self) -> int:
        return -(-self.total_steps // self.steps_per_round)

    def steps_of(self, rnd: int) -> range:
        """The steps of round ``rnd``: one (BSP, SSP), an epoch (ASP), H (DiLoCo); the
        last round may be short."""
        spr = self.steps_per_round
        return range(rnd * spr, min((rnd + 1) * spr, self.total_steps))

    def round_tasks(self, rnd: int) -> int:
        """Tasks in round ``rnd``: what a BSP (or DiLoCo) shard waits for before it steps."""
        return sum(self.plan.num_tasks(step) for step in self.steps_of(rnd))

    def deal(self, rnd: int) -> None:
        """Deal a round's tasks into the workers' deques (once per round)."""
        if rnd in self.dealt:
            return
        self.dealt.add(rnd)
        if self.adaptive:
            grain = self._grain()
            for step in self.steps_of(rnd):
                self.plan.set_grain(step, grain)
        tasks = [t for step in self.steps_of(rnd) for t in self.plan.tasks(step)]
        self.deques[rnd] = [deque() for _ in range(self.num_workers)]
        owners = self._parts(tasks) if self.by_part else self._owners(len(tasks))
        for task, worker in zip(tasks, owners):
            self.deques[rnd][worker].append(task)

    def _grain(self) -> int:
        """Tasks per step for the next round: the plan's finest cut while measured speeds
        differ (a straggler's share must be movable in small pieces), else one task per
        live worker. Unmeasured workers count as equal: the first rounds are coarse."""
        live = [w for w in range(self.num_workers) if w not in self.gone]
        if not live:                           # nobody to deal to (the run is failing)
            return 1
        if self.steal and self._measured():
            speeds = [self.speeds[w] for w in live]
            spread = max(speeds) / max(min(speeds), 1e-12)
            self.fine = spread > (BALANCED if self.fine else IMBALANCE)
        else:
            self.fine = False
        if self.fine:
            self.fine_rounds += 1
        else:
            self.coarse_rounds += 1
        return self.plan.tasks_per_step if self.fine else min(len(live), self.plan.tasks_per_step)

    def grain_of(self, rnd: int) -> int:
        """How many tasks each step of a dealt round was cut into (its first step's; the
        others of an ASP epoch were cut alike, a short last batch clipped by ``num_tasks``)."""
        steps = self.steps_of(rnd)
        return self.plan.num_tasks(steps[0]) if steps else 0

    def knows(self, ids) -> bool:
        """Every id names a task of a round dealt so far, as that round was cut: a report
        can only be of tasks dealt, and a step not dealt yet has no grain to read ids by."""
        stride = self.plan.tasks_per_step
        return (self.plan.valid_ids(ids, self.total_steps)
                and all(self.round_of(tid // stride) in self.dealt for tid in ids))

    def _owners(self, n: int) -> list[int]:
        """Who gets each of n tasks: equal round-robin until speeds are known; then each
        task to the worker that would finish it first, (tasks it has + 1) / speed, which
        minimises the round's finishing time for equal tasks (proportional shares alone
        can hand a straggler one task too many)."""
        live = [w for w in range(self.num_workers) if w not in self.gone]
        if not live:
            return []
        speeds = [self.speeds[w] for w in live]
        if not self.steal or None in speeds:
            return self._probe([live[i % len(live)] for i in range(n)], live)
        assigned = [0] * len(live)
        owners = []
        for _ in range(n):
            i = min(range(len(live)), key=lambda j: ((assigned[j] + 1) / speeds[j], j))
            assigned[i] += 1
            owners.append(live[i])
        return self._probe(owners, live)

    def _parts(self, tasks: list[Task]) -> list[int]:
        """DiLoCo: part j of every step to worker j (a dead one's to a live one)."""
        live = [w for w in range(self.num_workers) if w not in self.gone]
        stride = self.plan.tasks_per_step
        return [t.id % stride if t.id % stride in live else live[t.id % stride % len(live)]
                for t in tasks] if live else []

    def _probe(self, owners: list[int], live: list[int]) -> list[int]:
        """A worker measured slow is dealt nothing, and a worker dealt nothing is never
        measured again: one preempted while it was measured (a shared node, a busy
        moment) would stay idle for the rest of the run. So a live worker dealt nothing
        for PROBE_ROUNDS - 1 rounds running gets one task in the next, the last of the
        most loaded worker's share, and its next report measures it again. If it is as
        slow as measured, that costs one task at its speed every PROBE_ROUNDS rounds."""
        for w in live:
            if w not in owners and self.starved[w] + 1 >= PROBE_ROUNDS and len(owners) >= len(live):
                busiest = max(live, key=lambda v: (owners.count(v), -v))
                owners[len(owners) - 1 - owners[::-1].index(busiest)] = w
            self.starved[w] = 0 if w in owners else self.starved[w] + 1
        return owners

    def note_speed(self, worker: int, samples_per_s: float) -> None:
        """Blend in a new measurement: an exponential average over about five reports,
        smooth enough that one preempted task does not starve a worker of work, quick
        enough to follow a worker that really slows down."""
        old = self.speeds[worker]
        self.speeds[worker] = samples_per_s if old is None else old + SPEED_ALPHA * (samples_per_s - old)

    def local_steps(self, worker: int, inner_steps: int) -> int:
        """Async DiLoCo's Dynamic Local Updates (Liu et al. 2024): a round of ``inner_steps``
        H, scaled by this worker's measured speed over the fastest live worker's, at least
        1. A slow worker's round then takes about as long as a fast one's, so it neither
        holds the others at the staleness gate nor pushes a pseudo-gradient many rounds
        old. H while any live worker is unmeasured."""
        live = [w for w in range(self.num_workers) if w not in self.gone]
        speeds = [self.speeds[w] for w in live]
        if worker not in live or None in speeds:
            return inner_steps
        return max(1, min(inner_steps, round(inner_steps * self.speeds[worker] / max(speeds))))

    # -- leases ---------------------------------------------------------------------
    def take(self, worker: int, own_rounds, steal_rounds,
             ahead: bool = False) -> tuple[Task | None, int | None]:
        """Lease ``worker``'s next task: own deque first, else steal from ``steal_rounds``;
        ``ahead``: the worker is still computing (see ``take_ahead``). Returns (task, victim)."""
        if ahead:
            return self.take_ahead(worker, own_rounds), None
        for rnd in own_rounds:
            if rnd in self.deques and self.deques[rnd][worker]:
                return self._lease(worker, rnd, self.deques[rnd][worker].popleft()), None
        if not self.steal:
            return None, None
        victim = self._most_loaded(worker, steal_rounds)
        if victim is None:
            return None, None
        rnd, v = victim
        theirs, mine = self.deques[rnd][v], self.deques[rnd][worker]
        count = steal_count(len(theirs), self._speed(worker), self._speed(v))
        if count == 0:
            return None, None             # the owner will finish them sooner than we could
        stolen = [theirs.pop() for _ in range(count)][::-1]       # from the back, order kept
        mine.extend(stolen)
        self.stolen_by[worker] += count
        self.stolen_from[v] += count
        self.steal_log.append((worker, v, rnd, count))
        return self._lease(worker, rnd, mine.popleft()), v

    def take_ahead(self, worker: int, own_rounds) -> Task | None:
        """Lease a task ahead for a worker that is still computing: from its own deque
        only (``steal_count`` assumes an idle thief), and never the last task of that
        deque while stealing is on. A task leased ahead cannot be stolen; left in the
        deque, a straggler's last task goes to whichever worker is idle first (the
        owner once it asks again, or a thief). Costs one scheduler round trip per
        task leased while the worker's deque still holds more, against tasks of tens
        of milliseconds (none is asked ahead once a lease says ``left`` 0)."""
        for rnd in own_rounds:
            mine = self.deques.get(rnd, [()] * self.num_workers)[worker]
            if len(mine) > (1 if self.steal else 0):
                return self._lease(worker, rnd, mine.popleft())
            if mine:
                return None                # the last one: wait until we are idle
        return None

    def take_more(self, worker: int, first: Task, fuse: int, ahead: bool = False,
                  any_step: bool = False) -> list[Task]:
        """Lease up to ``fuse - 1`` more tasks of ``first``'s step (``any_step``: of its
        round; async DiLoCo's round of inner steps) behind it from the front
        of the same deque, for the worker to compute together with it in one pass (one
        forward and backward over all their samples: on a CPU, four passes of 32 samples
        cost about twice one pass of 128). A task dealt again is never among them (it is
        pushed alone). What the worker holds cannot be stolen; so with stealing on, the
        deque's last task stays behind on a lease asked ahead (as in ``take_ahead``) and
        when another worker is expected to run out of work soon enough to do it sooner
        (``_tail_wanted``); otherwise the worker takes it too and does its whole share
        in one pass."""
        if first.id in self.redo:
            return []
        rnd = self.round_of(first.step)
        mine = self.deques.get(rnd, [()] * self.num_workers)[worker]
        keep = 1 if self.steal and mine and (ahead or self._tail_wanted(worker, rnd, mine[-1])) else 0
        more = []
        while (len(more) < fuse - 1 and len(mine) > keep and mine[0].id not in self.redo
               and (any_step or mine[0].step == first.step)):
            more.append(self._lease(worker, rnd, mine.popleft()))
        return more

    def _tail_wanted(self, worker: int, rnd: int, last: Task) -> bool:
        """Would a thief finish ``last``, the last task of ``worker``'s deque, sooner than
        ``worker`` would? With W_v the samples of round ``rnd`` that worker v still has to
        do (queued, or leased and not yet reported) and s_v its speed, ``worker`` alone
        ends at W / s; another worker v is idle at W_v / s_v and, stealing ``last`` (x
        samples), done at (W_v + x) / s_v: stealing helps if that is sooner. Unknown
        speeds: assume it may (keep the tail back)."""
        if not self._measured():
            return True
        left = [0] * self.num_workers
        for v, dq in enumerate(self.deques.get(rnd, ())):
            left[v] += sum(len(t.samples) for t in dq)
        for v, task in self.leases.values():
            if self.round_of(task.step) == rnd:
                left[v] += len(task.samples)
        x = len(last.samples)
        mine = left[worker] / self._speed(worker)
        return any((left[v] + x) / self._speed(v) < mine
                   for v in range(self.num_workers) if v != worker and v not in self.gone)

    def _speed(self, worker: int) -> float:
        """Measured speed, or 1.0 for everyone until all live workers are measured."""
        return (self.speeds[worker] or 1.0) if self._measured() else 1.0

    def _measured(self) -> bool:
        """Has every live worker reported a speed?"""
        return all(self.speeds[w] is not None for w in range(self.num_workers) if w not in self.gone)

    def _most_loaded(self, thief: int, rounds) -> tuple[int, int] | None:
        """The deque with the most work left, in time: tasks / owner's speed."""
        best, best_work = None, 0.0
        for rnd in rounds:
            for v, dq in enumerate(self.deques.get(rnd, ())):
                work = len(dq) / self._speed(v)
                if v != thief and work > best_work:
                    best, best_work = (rnd, v), work
        return best

    def _lease(self, worker: int, rnd: int, task: Task) -> Task:
        self.leases[task.id] = (worker, task)
        if not any(self.deques[rnd]):
            del self.deques[rnd]        # an empty round stays empty: tasks move only within one
        return task

    def complete(self, task_ids: list[int]) -> list[Task]:
        """End the leases of tasks whose gradients were pushed; return those tasks."""
        return [self.leases.pop(tid)[1] for tid in task_ids if tid in self.leases]

    # -- failures -------------------------------------------------------------------
    def reassign(self, dead: int, live: list[int]) -> list[Task]:
        """A worker died: its leased tasks go to the front of live workers' deques (and are
        marked ``redo``: pushed on their own, since the dead worker's push may have reached
        some shards), and its undealt tasks are shared out. Returns the leased ones."""
        self.gone.add(dead)
        redo = [task for worker, task in self.leases.values() if worker == dead]
        for i, task in enumerate(sorted(redo, key=lambda t: t.id, reverse=True)):
            del self.leases[task.id]
            self.redo.add(task.id)
            self._round_deques(self.round_of(task.step))[live[i % len(live)]].appendleft(task)
        for rnd, deques in self.deques.items():
            for i, task in enumerate(list(deques[dead])):
                deques[live[i % len(live)]].append(task)
            deques[dead].clear()
        return redo

    def revive(self, worker: int) -> None:
        """A replacement took a dead worker's id: deal to it again, speed unknown."""
        self.gone.discard(worker)
        self.speeds[worker] = None
        self.starved[worker] = 0

    def round_of(self, step: int) -> int:
        return step // self.steps_per_round

    def _round_deques(self, rnd: int) -> list[deque]:
        if rnd not in self.deques:           # an emptied round: open it again for the redo
            self.deques[rnd] = [deque() for _ in range(self.num_workers)]
        return self.deques[rnd]

    def unfinished(self) -> int:
        """Tasks leased and not yet completed, or still waiting in a deque."""
        return len(self.leases) + sum(len(dq) for deques in self.deques.values() for dq in deques)

    def left(self, rnd: int) -> int:
        """Tasks of a round not yet leased."""
        return sum(len(dq) for dq in self.deques.get(rnd, ()))

    def own_left(self, worker: int, rounds) -> int:
        """Tasks still waiting in ``worker``'s own deques of ``rounds`` (what a LEASE reply
        calls ``left``: 0 tells the worker that the tasks it computes are its last own
        ones, so it may push as backward goes, and need ask nothing ahead)."""
        return sum(len(self.deques[rnd][worker]) for rnd in rounds if rnd in self.deques)
