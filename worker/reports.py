"""Reports to the scheduler, sent without waiting for their answers.

After each push the worker tells the scheduler which tasks it pushed (REPORT). Nothing
waits on the answer there: the connection keeps the report ahead of the worker's next
LEASE, and the answers are collected later: when MAX_UNCONFIRMED_REPORTS are out,
before DONE (which must not overtake a lost report), and after each task done while
DONE waits for its answer (nothing else would send that task's report again). A
report still unanswered then is sent again by the Lazy Pirate retry of ``Peer.recv``.
"""
from __future__ import annotations

from ps.wire.client import Peer, RemoteError
from ps.wire.protocol import Kind
from worker.heartbeat import as_fenced

MAX_UNCONFIRMED_REPORTS = 32   # past this many unanswered reports, wait for the answers


class Reports:
    def __init__(self, scheduler: Peer, worker: int, inc: int, timeout_s: float, shards=None):
        self.scheduler = scheduler
        self.shards = shards               # a ShardClient: its byte counters ride on each report
        self.worker, self.inc = worker, inc
        self.timeout_s = timeout_s
        self.rids: list[int] = []          # reports not yet answered

    def send(self, step, ids, rejected, loss_sum, samples, compute_s, wait_s) -> None:
        """Tell the scheduler which tasks were pushed (``rejected``: refused by every shard)."""
        self.rids.append(self.scheduler.send(
            Kind.REPORT, worker=self.worker, inc=self.inc, step=step, tasks=ids,
            rejected=rejected, loss_sum=loss_sum, samples=samples, compute_s=compute_s,
            wait_s=wait_s, **self.bytes()))
        if len(self.rids) > MAX_UNCONFIRMED_REPORTS:
            self.collect()

    def bytes(self) -> dict:
        """This incarnation's payload bytes so far: ``bytes_pushed``, ``bytes_pulled``."""
        if self.shards is None:
            return {}
        return {"bytes_pushed": self.shards.wire_pushed, "bytes_pulled": self.shards.wire_pulled}

    def collect(self) -> None:
        """Wait until every report is answered (resending any whose answer is late)."""
        while self.rids:
            try:
                self.scheduler.recv(self.rids[0], self.timeout_s, "report")
            except RemoteError as exc:
                raise as_fenced(exc)
            self.rids.pop(0)
