"""Reports to the scheduler, sent without waiting for their answers.

After each push the worker tells the scheduler which tasks it pushed (REPORT). Nothing
waits on the answer there: the connection keeps the report ahead of the worker's next
LEASE, and the answers are collected later: when MAX_UNCONFIRMED_REPORTS are out,
before DONE (which must not overtake a lost report), and after each task done while
DONE waits for its answer (nothing else would send that task's report again). A
report still unanswered then is sent again by the Lazy Pirate retry of ``Peer.recv``.
"""
from __future__ import annotations

from ps.client import Peer, RemoteError
from ps.protocol import Error, Kind

from .heartbeat import Fenced

MAX_UNCONFIRMED_REPORTS = 32   # past this many unanswered reports, wait for the answers


class Reports:
    def __init__(self, scheduler: Peer, worker: int, inc: int, timeout_s: float):
        self.scheduler = scheduler
        self.worker, self.inc = worker, inc
        self.timeout_s = timeout_s
        self.rids: list[int] = []          # reports not yet answered

    def send(self, step, ids, rejected, loss_sum, samples, compute_s, wait_s) -> None:
        """Tell the scheduler which tasks were pushed (``rejected``: refused by every shard)."""
        self.rids.append(self.scheduler.send(
            Kind.REPORT, worker=self.worker, inc=self.inc, step=step, tasks=ids,
            rejected=rejected, loss_sum=loss_sum, samples=samples, compute_s=compute_s,
            wait_s=wait_s))
        if len(self.rids) > MAX_UNCONFIRMED_REPORTS:
            self.collect(wait=True)

    def collect(self, wait: bool) -> None:
        """Take in the answers to our reports; with ``wait``, until every one is in."""
        still = []
        for rid in self.rids:
            try:
                self.scheduler.recv(rid, self.timeout_s if wait else 0.0, "report")
            except TimeoutError:
                if wait:
                    raise
                still.append(rid)
            except RemoteError as exc:
                raise Fenced(exc.reason) if exc.code == Error.FENCED else exc
        self.rids = still
