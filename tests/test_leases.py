"""worker.leases.Leases against a scripted scheduler: which LEASE requests it sends.

A request is asked ahead while the worker computes, except when the lease it got left
its own deque empty (``left`` 0): an ahead lease never steals, so it could only come
back empty. Then the task in hand is the worker's last own one (``last_own``).
"""
from __future__ import annotations

from worker.leases import Leases


class Scheduler:
    """A Peer stand-in: records every LEASE sent, answers from a script in order."""

    def __init__(self, replies: list[dict]):
        self.replies = list(replies)
        self.sent: list[dict] = []
        self.answers: dict[int, dict] = {}

    def send(self, kind, **fields) -> int:
        rid = len(self.sent)
        self.sent.append(fields)
        self.answers[rid] = self.replies.pop(0)
        return rid

    def recv(self, rid: int, timeout_s: float, what: str = "") -> tuple[dict, list]:
        return self.answers.pop(rid), []


def task(tid: int, step: int) -> list:
    return [tid, step, [tid]]


def lease(t, left: int, more=()) -> dict:
    return {"task": t, "more": list(more), "step_tasks": 4, "left": left}


def test_no_lease_is_asked_ahead_when_the_deque_is_empty():
    # One own task in step 0: lease it (left 0), compute, then ask once more, as an
    # idle worker that may steal; nothing ahead in between.
    sched = Scheduler([lease(task(0, 0), left=0), lease(None, left=0)])
    leases = Leases(sched, worker=0, inc=1, timeout_s=1.0, fuse=4)
    tasks, step_tasks, redo = leases.next(0)
    assert tasks == [task(0, 0)] and step_tasks == 4 and not redo
    assert leases.last_own(0) and not leases.last_own(1)
    assert leases.next(0)[0] is None
    assert [m["ahead"] for m in sched.sent] == [False, False]


def test_a_lease_is_asked_ahead_while_own_tasks_are_left():
    # Two own tasks: after the first (left 1) the next is asked ahead and used; after
    # the second (left 0) nothing is; the idle ask finds nothing to steal.
    sched = Scheduler([lease(task(0, 0), left=1), lease(task(2, 0), left=0),
                       lease(None, left=0)])
    leases = Leases(sched, worker=0, inc=1, timeout_s=1.0)
    assert leases.next(0)[0] == [task(0, 0)]
    assert not leases.last_own(0)          # the ahead reply holds a task: not the last
    assert leases.next(0)[0] == [task(2, 0)]
    assert leases.last_own(0)
    assert leases.next(0)[0] is None
    assert [m["ahead"] for m in sched.sent] == [False, True, False]


def test_fused_tasks_come_back_together():
    sched = Scheduler([lease(task(0, 3), left=0, more=[task(2, 3), task(4, 3)])])
    leases = Leases(sched, worker=1, inc=1, timeout_s=1.0, fuse=3)
    assert leases.next(3)[0] == [task(0, 3), task(2, 3), task(4, 3)]
    assert sched.sent == [{"worker": 1, "inc": 1, "step": 3, "ahead": False, "fuse": 3}]


def test_a_stolen_or_redone_task_with_left_0_is_the_last_own_one_too():
    # An idle worker's lease may steal (or take a task dealt again): with its own deque
    # empty (left 0) nothing is asked ahead, and the next call asks again, idle.
    stolen = dict(lease(task(7, 2), left=0), redo=True)
    sched = Scheduler([stolen, lease(None, left=0)])
    leases = Leases(sched, worker=0, inc=1, timeout_s=1.0)
    tasks, _, redo = leases.next(2)
    assert tasks == [task(7, 2)] and redo and leases.last_own(2)
    assert leases.next(2)[0] is None
    assert [m["ahead"] for m in sched.sent] == [False, False]
