"""A worker's reports reach the scheduler even when one is lost on the wire.

Reports are sent without waiting for their answers (``worker.reports``). A worker that
is done stepping waits for DONE's answer and meanwhile does tasks dealt again; the
report of such a task, if lost, must be sent again, or the scheduler waits for that
task and the worker for DONE until both give up. Here a scheduler stand-in (a ROUTER
in a thread) drops the first copy of that report and answers DONE only once the
report has come.
"""
import sys
import threading

import zmq

from cluster import ROOT

sys.path.insert(0, ROOT)
from ps.wire.client import Peer  # noqa: E402
from ps.wire.protocol import Kind, decode, encode  # noqa: E402
from worker.reports import Reports  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402
from worker.runner import Worker  # noqa: E402

TASK = [7, 0, [0, 1]]      # the task dealt again: id 7 of step 0


class LossyScheduler(threading.Thread):
    """Leases TASK once, drops the first REPORT, answers DONE once TASK is reported."""

    def __init__(self, ctx: zmq.Context):
        super().__init__(daemon=True)
        self.router = ctx.socket(zmq.ROUTER)
        self.port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.reports_seen = 0         # copies of the report that reached us, dropped one included
        self.reported: list = []      # task ids of the reports we answered
        self.leased = False
        self.stop = threading.Event()

    def run(self) -> None:
        done = None
        while not self.stop.is_set():
            if not self.router.poll(50):
                continue
            ident, raw = self.router.recv_multipart()
            header = decode(raw)
            kind, rid = header["kind"], header["rid"]
            if kind == Kind.DONE:
                done = (ident, rid)
            elif kind == Kind.LEASE:
                task, self.leased = (None if self.leased else TASK), True
                self.router.send_multipart([ident, encode(Kind.OK, rid, task=task, step_tasks=2,
                                                          redo=task is not None, left=0)])
            elif kind == Kind.REPORT:
                self.reports_seen += 1
                if self.reports_seen == 1:
                    continue                           # lost on the wire
                self.reported += header["tasks"]
                self.router.send_multipart([ident, encode(Kind.OK, rid)])
            if done is not None and TASK[0] in self.reported:
                self.router.send_multipart([done[0], encode(Kind.OK, done[1], finisher=True)])
                done = None

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        self.router.close(linger=0)


def test_a_lost_report_of_a_task_done_while_waiting_for_done_is_sent_again():
    ctx = zmq.Context()
    scheduler = LossyScheduler(ctx)
    scheduler.start()
    worker = Worker.__new__(Worker)          # only what wait_for_all uses: no model, no job
    worker.config = WorkerConfig(f"tcp://127.0.0.1:{scheduler.port}", "unused", timeout_s=2.0)
    worker.id, worker.inc, worker.heartbeat, worker.mode = 0, 1, None, "bsp"
    worker.scheduler = Peer(ctx, worker.config.scheduler, "scheduler")
    worker.reports = Reports(worker.scheduler, 0, 1, worker.config.timeout_s)
    # The task's push is beside the point: only its report goes out.
    worker.run_alone = lambda task, step_tasks: worker.reports.send(
        task[1], [task[0]], [], 0.5, len(task[2]), 0.01, 0.0)
    try:
        assert worker.wait_for_all() is True
        assert scheduler.reports_seen == 2 and scheduler.reported == [TASK[0]]
        assert worker.reports.rids == []
    finally:
        worker.scheduler.close()
        scheduler.close()
        ctx.term()
