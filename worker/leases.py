"""Task leases, one request kept ahead, so a worker never idles between tasks.

While the worker computes task k, its lease request for task k+1 is already at the
scheduler (and usually answered): the ~0.2 ms round trip hides behind compute. The
cost is that a task leased ahead can no longer be stolen, so the scheduler never
leases ahead the last task of a worker's deque (``Dealer.take_ahead``): a
straggler's last task stays where an idle worker can steal it. A lease asked ahead
also never steals (a straggler that steals at the start of a step becomes the
step's last finisher); once the worker is idle it asks again, and then it may steal.
"""
from __future__ import annotations

from ps.client import Peer, RemoteError
from ps.protocol import Error, Kind

from .heartbeat import Fenced


class Leases:
    def __init__(self, scheduler: Peer, worker: int, inc: int, timeout_s: float):
        self.scheduler = scheduler
        self.worker, self.inc = worker, inc
        self.timeout_s = timeout_s
        self.ahead: tuple[int, int] | None = None    # (rid, step) of the request in flight
        self.early: dict | None = None               # its reply, if ``last_own`` took it in

    def next(self, step: int) -> tuple[list | None, int, bool]:
        """The next task ``[id, step, sample ids]`` for ``step`` (-1 in ASP: any), or None
        when there is none left; the number of tasks in the task's step; and whether it
        is a task dealt again (``redo``)."""
        if self.ahead is not None and self.ahead[1] == step:
            reply = self.early or self._answer(self.ahead[0], step)
            if reply["task"] is None:          # our own deque is empty; now that we are
                reply = self._answer(self._ask(step, ahead=False), step)   # idle, we may steal
        else:
            reply = self._answer(self._ask(step, ahead=False), step)
        task, self.early = reply["task"], None
        self.ahead = (self._ask(step, ahead=True), step) if task else None   # while we compute
        return task, reply["step_tasks"], bool(reply.get("redo"))

    def last_own(self, step: int) -> bool:
        """Whether the task being computed is our last own task of ``step``: the lease
        asked ahead came back with no task and ``left`` 0 (tasks stolen later are pushed
        apart). Never waits: an answer not yet in means no."""
        if self.ahead is None or self.ahead[1] != step:
            return False
        if self.early is None:
            try:
                self.early = self._answer(self.ahead[0], step, timeout_s=0.0)
            except TimeoutError:
                return False
        return self.early["task"] is None and self.early.get("left", -1) == 0

    def _ask(self, step: int, ahead: bool) -> int:
        return self.scheduler.send(Kind.LEASE, worker=self.worker, inc=self.inc, step=step,
                                   ahead=ahead)

    def _answer(self, rid: int, step: int, timeout_s: float | None = None) -> dict:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            return self.scheduler.recv(rid, timeout_s, f"lease for step {step}")[0]
        except RemoteError as exc:
            raise Fenced(exc.reason) if exc.code == Error.FENCED else exc
