"""No silent hangs: what a waiting step is waiting for, by name.

A BSP step completes on a shard when every one of its tasks has been pushed there, so
"why is step t not done?" has a precise answer: these task ids are missing, and each is
leased to worker W, or queued in worker W's deque. The scheduler knows who holds what
(``ps.core.dealer``) and which tasks were reported (``ps.scheduler.runstate``); a shard knows which
tasks of its current step it already has. ``missing`` is the scheduler's half: its
STATUS reply carries it when asked about a step, its log names it after ``WAIT_LOG_S``
without a REPORT, and its training deadline ends the run with it. A worker blocked on a
pull joins both halves in one log line (``worker.waits``)::

    step 12 pull waiting on server1 (shard 1 at version 11: missing tasks 46 leased to
    worker 2, 47 queued for worker 2)
"""
from __future__ import annotations

import logging

from ps.core.dealer import Dealer
from ps.scheduler.runstate import RunState
from ps.wire.protocol import WAIT_LOG_S

log = logging.getLogger("ps.scheduler")


def holders(dealer: Dealer, run: RunState, step: int) -> list[list]:
    """``[task id, who has it]`` for every task of ``step`` not yet reported: "worker W"
    (leased), "queued for worker W", or "not dealt"."""
    ids = dealer.plan.ids(step)
    where = {tid: f"worker {w}" for tid, (w, _) in dealer.leases.items()}
    for deques in dealer.deques.values():
        for w, dq in enumerate(deques):
            where.update({t.id: f"queued for worker {w}" for t in dq if t.step == step})
    return [[tid, where.get(tid, "not dealt")] for tid in ids if tid not in run.counted]


def describe(missing: list[list]) -> str:
    """``[[46, "worker 2"], ...]`` -> "46 leased to worker 2, 47 queued for worker 2"."""
    return ", ".join(f"{tid} leased to {who}" if who.startswith("worker") else f"{tid} {who}"
                     for tid, who in missing) or "nothing (every task reported)"


def stalled_step(dealer: Dealer | None, run: RunState | None) -> str:
    """The scheduler's diagnosis of a training phase without progress: the oldest step
    with unreported tasks and who holds them, and the workers behind."""
    if dealer is None or run is None:
        return "nothing (the cluster has not formed)"
    steps = [t.step for _, t in dealer.leases.values()]
    steps += [t.step for deques in dealer.deques.values() for dq in deques for t in dq]
    if not steps:
        return run.diagnose()
    step = min(steps)
    return f"step {step} is missing tasks {describe(holders(dealer, run, step))}; {run.diagnose()}"


def log_stall(dealer: Dealer, run: RunState, quiet_s: float) -> float:
    """Training without a REPORT for ``quiet_s`` seconds: past WAIT_LOG_S, log what the
    oldest step waits for. Returns the seconds until it is worth looking again."""
    if quiet_s <= WAIT_LOG_S:
        return WAIT_LOG_S - quiet_s
    log.warning("no report for %.1f s: %s", quiet_s, stalled_step(dealer, run))
    return 5 * WAIT_LOG_S
