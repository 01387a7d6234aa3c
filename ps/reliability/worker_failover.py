"""Worker failover: what happens to a dead worker's tasks, and who takes its place.

When membership (``ps.scheduler.membership``) declares a worker dead, the scheduler calls
``Failover.worker_died``: the incarnation is fenced and the worker's leased tasks
are dealt again to the live workers; in BSP, the tasks of steps every shard has
already completed count as applied instead (their gradients are in the parameters,
and pushing them again would be refused as duplicates). A worker that registers
mid-run goes to ``Failover.replace``: it takes a dead worker's id with a new
incarnation and starts at the step (or clock) the slowest live worker has leased.

The scheduler keeps the phase decisions (whether the run can go on); this class
keeps the record of deaths and rejoins for summary.json. The invariant: every task
a dead worker held is either counted as applied or back in a live worker's deque.
"""
from __future__ import annotations

import logging
import time

from ps.core.dealer import Dealer
from ps.reliability.journal import Journal
from ps.scheduler import registration
from ps.scheduler.config import SchedulerConfig
from ps.scheduler.membership import Member, Membership
from ps.scheduler.runstate import RunState
from ps.trace import Tracer
from ps.wire.protocol import Error, ProtocolError

log = logging.getLogger("ps.scheduler")


def complete_below(shard_stats: dict[int, dict], servers: int) -> int:
    """BSP: the steps below this one are complete on every shard (the lowest version
    the shards' counters report), so each of their tasks was applied; 0 until every
    shard has reported."""
    if len(shard_stats) < servers:
        return 0
    return min(st.get("version", 0) for st in shard_stats.values())


class Failover:
    def __init__(self, config: SchedulerConfig, members: Membership, tracer: Tracer, t0: float,
                 journal: Journal | None = None):
        self.config = config
        self.journal = journal or Journal(None)   # deaths and replacements are journaled
        self.members = members
        self.tracer = tracer
        self.t0 = t0                             # the scheduler's start, for the record's times
        self.lease_step: dict[int, int] = {}     # worker -> latest step it leased
        self.deaths: list[dict] = []             # each death verdict, for the summary
        self.rejoins: list[dict] = []            # each replacement that joined mid-run

    def leased(self, worker: int, step: int) -> None:
        """Note how far a worker has got (a replacement starts at the slowest)."""
        self.lease_step[worker] = max(self.lease_step.get(worker, 0), step)

    def worker_died(self, member: Member, dealer: Dealer, run: RunState,
                    shard_stats: dict[int, dict]) -> list[int]:
        """Fence the incarnation and deal its tasks again; return the live workers."""
        self.members.retire(member)
        live = self.members.live("worker")
        if self.config.mode == "bsp":
            # Tasks of steps every shard has completed were applied: nothing to redo.
            below = complete_below(shard_stats, self.config.servers)
            done = [t.id for w, t in dealer.leases.values() if w == member.index and t.step < below]
            spe = dealer.plan.steps_per_epoch
            for task in dealer.complete(done):
                run.count_task(task.id, task.step // spe, len(task.samples), rejected=False)
            self.journal.applied(done)
        redealt = dealer.reassign(member.index, live) if live else []
        run.mark_dead(member.index)
        death = {"worker": member.index, "incarnation": member.inc,
                 "detected_at_s": round(time.monotonic() - self.t0, 3),
                 "detected_wall": time.time(),      # to line up with events outside the run
                 "tasks_redealt": len(redealt)}
        self.deaths.append(death)
        self.journal.death(member.role, member.index, member.inc, death)
        self.tracer.instant("death", "fault", **death)
        log.warning("worker %d (incarnation %d) declared dead; %d leased tasks dealt again",
                    member.index, member.inc, len(redealt))
        return live

    def replace(self, header: dict, job: dict, dealer: Dealer, run: RunState) -> tuple[int, int, int]:
        """A worker joining mid-run takes the id of a dead one, with a new incarnation, and
        starts at the step (or clock) the slowest live worker is on (ASP has no steps: -1).
        Returns (worker id, incarnation, start step)."""
        dead = [w for w in range(self.config.workers) if w not in self.members.live("worker")]
        index = registration.pick_replacement(header.get("worker"), dead)
        if registration.job_of(header) != job or header.get("seed") != self.config.seed:
            raise ProtocolError(Error.BAD_FIELD, "the replacement's job differs from the cluster's")
        member = self.members.join("worker", index, time.monotonic())
        rejoin = {"worker": index, "incarnation": member.inc, "at_s": round(time.monotonic() - self.t0, 3)}
        dealer.revive(index)
        run.revive(index)
        live_steps = [self.lease_step.get(w, 0) for w in self.members.live("worker") if w != index]
        pooled = self.config.mode == "asp" or self.config.diloco_async
        start = -1 if pooled else min(live_steps, default=0)
        self.lease_step[index] = start
        log.warning("worker %d rejoins as incarnation %d at step %d", index, member.inc, start)
        self.tracer.instant("rejoin", "fault", worker=index, inc=member.inc, step=start)
        rejoin["start_step"] = start
        self.journal.member("worker", index, member.inc, rejoin)    # on disk before the reply
        self.rejoins.append(rejoin)
        return index, member.inc, start
