"""Re-forming: a restarted scheduler replays its journal and gathers the cluster again.

When the scheduler starts with a journal that holds a run (``ps.reliability.journal``),
``Restart._replay`` rebuilds its state from the records: the shard map and the job, every member with its
incarnation (none given out again), deaths and replacements, the reports (losses,
timings, each task counted once), the rounds of tasks dealt, checkpoint commits and the
phase. The scheduler then enters the **re-forming** phase (``Reform``):

* every member the journal knows is unconfirmed; its requests are refused with
  ``reregister`` and it registers again with its role, index and incarnation (servers
  add their counters, so the scheduler learns every shard's version at once);
* a LEASE, REPORT, DONE or FINISHED of a confirmed member is not answered yet: the
  requester sends it again (Lazy Pirate, same request id) and is answered once the
  cluster has re-formed;
* a member that does not come back within ``--dead-after-s`` is declared dead as usual.

Once every live member is back, the tasks the journal does not show as applied are
dealt again. In BSP the steps every shard has completed are counted as applied; each
other task of a round dealt before the restart is dealt again marked ``redo``: it may
still be held under a lease of the old scheduler, so it is pushed alone, and a shard
that already has it refuses just that task (the task-id check keeps exactly-once).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from ps.core.tasks import TaskPlan
from ps.reliability import journal as journaling
from ps.reliability import worker_failover
from ps.scheduler import registration
from ps.scheduler.forming import plan_run
from ps.scheduler.membership import Membership
from ps.wire.protocol import Error, Kind, ProtocolError, is_int

if TYPE_CHECKING:                  # for the annotations only: the scheduler imports us
    from ps.scheduler.scheduler import Scheduler

log = logging.getLogger("ps.scheduler")

REPORTS_REMEMBERED = 8192      # (incarnation, rid) of journaled reports: a resent one is not counted twice


class Reform:
    """The re-forming phase of a restarted scheduler ``s``: who is still awaited, and what
    to deal again once everyone is back. It rebuilds the scheduler's state from the
    journal, so it holds the scheduler itself (a ``Scheduler``, which mixes in ``Restart``)."""

    def __init__(self, s: "Scheduler", records: int):
        self.s = s
        self.records = records
        self.dealt: set[int] = set()            # rounds dealt before the restart
        self.reported: dict[tuple, None] = {}   # (inc, rid) of journaled reports, oldest first
        self.resume_phase = "training"
        self.restarts: list[dict] = []          # earlier restarts, for the summary
        self.started = time.monotonic()
        self.awaited: set[tuple[str, int]] = set()
        self.done = False

    def apply(self, r: dict, plan: TaskPlan, now: float) -> None:
        """One journal record into the scheduler's state."""
        s, t = self.s, r["t"]
        if t == "report":
            s.run.report(r["worker"], r["step"], len(r["tasks"]), r["samples"], r["loss_sum"],
                         r["compute_s"], r["wait_s"])
            s.run.count_tasks(plan, r["tasks"], set(r["rejected"]))
            self.reported[(r["inc"], r["rid"])] = None
            if len(self.reported) > REPORTS_REMEMBERED:
                del self.reported[next(iter(self.reported))]
        elif t == "applied":
            s.run.count_tasks(plan, r["ids"])
        elif t == "dealt":
            self.dealt.add(r["round"])
            for step in s.dealer.steps_of(r["round"]):     # the grain it was cut into
                plan.set_grain(step, r["tasks"])
        elif t == "started":
            s.run.t_start = r["at"]
        elif t == "member":                      # a replacement took a dead worker's id
            s.members.restore(r["role"], r["index"], r["inc"], now)
            s.dealer.revive(r["index"])
            s.run.revive(r["index"])
            if r.get("rejoin"):
                s.failover.rejoins.append(r["rejoin"])
        elif t == "dead":
            member = s.members.members.get((r["role"], r["index"]))
            if member is not None and member.inc == r["inc"]:
                s.members.retire(member)
            s.dealer.gone.add(r["index"])
            s.run.mark_dead(r["index"])
            s.failover.deaths.append(r["death"])
        elif t == "commit":
            s.recovery.committed = max(s.recovery.committed, r["version"])
        elif t == "phase":
            self.resume_phase = r["phase"]
            s.finisher = r.get("finisher", s.finisher)
            s.run.t_end = r.get("t_end", s.run.t_end)
        elif t == "restart":
            self.restarts.append({k: v for k, v in r.items() if k != "t"})

    def expect(self) -> None:
        """The members to wait for: every live server, and the workers the phase needs."""
        workers = {"training": None, "finishing": {self.s.finisher}, "stopping": set()}[self.resume_phase]
        self.awaited = {(m.role, m.index) for m in self.s.members.members.values()
                        if m.alive and (m.role == "server" or workers is None or m.index in workers)}

    def seen_report(self, inc: int, rid: int) -> bool:
        """Was this REPORT journaled before the restart (so it is a resend, counted already)?"""
        return (inc, rid) in self.reported

    def check(self) -> None:
        """Re-formed once every awaited member is back or declared dead."""
        s = self.s
        if self.done or any(s.members.members[key].alive and not s.members.members[key].confirmed
                            for key in self.awaited):
            return
        self.done = True
        redealt = self.deal_again()
        s.phase = self.resume_phase
        s.deadline = time.monotonic() + s.config.timeout_s
        record = {"at_s": round(self.started - s.t0, 3),
                  "reform_s": round(time.monotonic() - self.started, 3),
                  "reformed_wall": time.time(), "journal_records": self.records,
                  "members_back": sum(m.confirmed for m in s.members.members.values()),
                  "tasks_redealt": redealt}
        self.restarts.append(record)
        s.journal.restarted(record)
        log.warning("cluster re-formed %.2f s after the restart; %d tasks dealt again, resuming %s",
                    record["reform_s"], redealt, self.resume_phase)

    def deal_again(self) -> int:
        """Deal again every task of a round dealt before the restart that the journal does
        not show as applied; in BSP, first count the steps every shard has completed."""
        s = self.s
        dealer, run, plan = s.dealer, s.run, s.dealer.plan
        complete_below = (worker_failover.complete_below(s.shard_stats, s.config.servers)
                          if s.config.mode == "bsp" else 0)
        if complete_below:
            done = [tid for step in range(complete_below) for tid in plan.ids(step)
                    if tid not in run.counted]
            run.count_tasks(plan, done)
            s.journal.applied(done)
        live = s.members.live("worker")
        redealt = 0
        for rnd in sorted(self.dealt):
            dealer.dealt.add(rnd)
            steps = [step for step in dealer.steps_of(rnd) if step >= complete_below
                     and any(tid not in run.counted for tid in plan.ids(step))]
            todo = [t for step in steps for t in plan.tasks(step) if t.id not in run.counted]
            if not todo or not live:
                continue
            dealer.deques[rnd] = [deque() for _ in range(dealer.num_workers)]
            for i, task in enumerate(todo):
                dealer.redo.add(task.id)
                dealer.deques[rnd][live[i % len(live)]].append(task)
            redealt += len(todo)
        if s.config.mode == "asp" or s.config.diloco_async:     # epochs dealt from a pool
            s.next_round = max(self.dealt, default=-1) + 1
        return redealt


class Restart:
    """A restarted scheduler's start-up, replay and re-forming calls (mixed into
    ``Scheduler``; ``Reform`` holds the re-forming phase's own state)."""

    def _start_from_journal(self) -> "Reform | None":
        """At start-up: a journal of this run is replayed (re-forming); none is begun."""
        records = self.journal.records
        if not records:
            self.journal.config(journaling.fingerprint(self.config))
            return None
        if records[0].get("config") != journaling.fingerprint(self.config):
            self.fail(f"journal {self.config.journal} is of another run (other flags); not replayed")
            return None
        reform = self._replay(records)
        if reform is not None:
            self.phase = "reforming"
        self.deadline = time.monotonic() + self.config.timeout_s
        return reform

    def _replay(self, records: list[dict]) -> "Reform | None":
        """Rebuild the scheduler's state from the journal; None when no cluster had formed
        (the roles' REGISTER requests are still waiting: forming starts again)."""
        formed = next((r for r in records if r["t"] == "formed"), None)
        if formed is None:
            self.members = Membership(self.config.dead_after_s, journaling.next_incarnation(records))
            self.failover.members = self.members
            return None
        cfg, now = self.config, time.monotonic()
        self.t0 = self.failover.t0 = records[0].get("t0", self.t0)
        job = formed["job"]
        plan, self.dealer, self.run = plan_run(cfg, job, formed["steps"], formed["tasks_per_step"])
        self.shard_map = formed["shards"]
        self.servers = {sh["index"]: {"endpoint": sh["endpoint"]} for sh in self.shard_map}
        self.workers = {w: job for w in range(cfg.workers)}
        self.members = Membership(cfg.dead_after_s, journaling.next_incarnation(records))
        self.failover.members = self.members
        for role, index, inc in formed["members"]:
            self.members.restore(role, index, inc, now)
        self.run.count_tasks(plan, [tid for step in range(formed["start"]) for tid in plan.ids(step)])
        for step, loss in enumerate(formed.get("losses_before", [])):
            self.run.loss_sum[step], self.run.loss_samples[step] = loss, 1
        self.recovery.committed = formed["start"] if formed.get("resumed_from") else 0
        self.recovery.resumed_from = formed.get("resumed_from")
        reform = Reform(self, len(records))
        for r in records:
            reform.apply(r, plan, now)
        reform.expect()
        log.warning("restarted from the journal (%d records): re-forming the cluster", len(records))
        return reform

    def _held_while_reforming(self, header: dict) -> bool:
        """Re-forming: a confirmed worker's LEASE, REPORT, DONE or FINISHED is not answered
        yet (its sender resends it and is answered once the cluster is back); an
        unconfirmed worker's is refused with REREGISTER."""
        if self.phase != "reforming" or header["kind"] not in (Kind.LEASE, Kind.REPORT, Kind.DONE,
                                                                Kind.FINISHED):
            return False
        self.members.seen("worker", header["worker"], header["inc"], time.monotonic())
        return True

    def _register_again(self, ident, header: dict) -> None:
        """A member registers again with its role, index and incarnation (REGISTER with
        ``inc``); a server adds its counters. Answered at once, with the incarnations to fence."""
        role, index = header["role"], header.get("index")
        if not is_int(index) or role not in ("server", "worker"):
            raise ProtocolError(Error.BAD_FIELD, "a member registering again names its role and index")
        stats = (registration.server_stats(header["stats"], index, self.shard_map)
                 if "stats" in header else None)
        self.members.register_again(role, index, header["inc"], time.monotonic())
        if role == "server" and stats is not None:
            self.shard_stats[index] = stats
        log.info("%s %d (incarnation %d) registered again", role, index, header["inc"])
        self.reply(ident, Kind.OK, header["rid"], fenced=self.members.fenced)
