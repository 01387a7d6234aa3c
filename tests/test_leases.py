"""worker.leases.Leases against a scripted scheduler: which LEASE requests it sends; and
what the real scheduler answers to ``or_next``.

A request is asked ahead while the worker computes, except when the lease it got left
its own deque empty (``left`` 0): an ahead lease never steals, so it could only come
back empty. Then the task in hand is the worker's last own one (``last_own``). An idle
worker's lease (``or_next``) brings a task of its next step when nothing is left to
steal in this one; that task is kept for the call for its step.
"""
from __future__ import annotations

import pytest

from live import BareScheduler

from ps.wire.protocol import Kind
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
    assert sched.sent == [{"worker": 1, "inc": 1, "step": 3, "ahead": False, "or_next": False,
                           "fuse": 3}]


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


def test_an_idle_lease_brings_the_next_steps_task_for_the_next_call():
    # Step 0's own task (left 0), then the idle lease with or_next: nothing to steal, so
    # the scheduler answers with step 1's task. Step 0 is over for this worker; step 1
    # starts with that task, and no further message.
    sched = Scheduler([lease(task(0, 0), left=0), lease(task(2, 1), left=0)])
    leases = Leases(sched, worker=0, inc=1, timeout_s=1.0)
    assert leases.next(0)[0] == [task(0, 0)]
    assert leases.next(0, or_next=True) == (None, 0, False)
    tasks, step_tasks, redo = leases.next(1)
    assert tasks == [task(2, 1)] and step_tasks == 4 and not redo
    assert leases.last_own(1)               # its left 0 counts step 1's deque
    assert [(m["ahead"], m["or_next"], m["step"]) for m in sched.sent] == [
        (False, False, 0), (False, True, 0)]


def test_an_older_rounds_task_in_answer_to_an_idle_lease_is_for_now():
    # SSP: a lease at clock 3 may hand out a task of an older round (here one dealt
    # again, of step 1): it is this call's task, not kept for the next clock.
    redone = dict(lease(task(5, 1), left=0), redo=True)
    sched = Scheduler([redone])
    leases = Leases(sched, worker=0, inc=1, timeout_s=1.0)
    tasks, _, redo = leases.next(3, or_next=True)
    assert tasks == [task(5, 1)] and redo
    # ASP leases with step -1 (any) and never or_next: every task is for now.
    sched = Scheduler([lease(task(0, 0), left=0)])
    assert Leases(sched, worker=0, inc=1, timeout_s=1.0).next(-1)[0] == [task(0, 0)]
    assert sched.sent[0]["or_next"] is False


def test_a_kept_task_is_never_dropped_by_a_call_for_another_step():
    # Leased to us, a kept task must be computed: a call for any other step than its
    # own is a bug in the caller, and says so instead of losing the task.
    sched = Scheduler([lease(task(0, 0), left=0), lease(task(2, 1), left=0)])
    leases = Leases(sched, worker=0, inc=1, timeout_s=1.0)
    leases.next(0)
    leases.next(0, or_next=True)
    with pytest.raises(RuntimeError, match="kept"):
        leases.next(0)
    assert leases.next(1)[0] == [task(2, 1)] and len(sched.sent) == 2


@pytest.mark.timeout(60)
def test_the_scheduler_answers_or_next_with_the_next_steps_task(tmp_path):
    # A real scheduler and server; this test is the only worker, 2 steps of 2 tasks.
    with BareScheduler(tmp_path, workers=1, steps=2, tasks_per_step=2) as cluster:
        [(peer, inc)] = cluster.register(samples=8)

        def lease(step, or_next=False):
            answer, _ = peer.request(Kind.LEASE, 10, worker=0, inc=inc, step=step,
                                     or_next=or_next)
            task = answer["task"]
            return (task[0], task[1], answer["left"]) if task else None

        first, second = lease(0), lease(0)
        assert [t[1:] for t in (first, second)] == [(0, 1), (0, 0)]
        third = lease(0, or_next=True)          # step 0 is empty: step 1's first task
        assert third[1:] == (1, 1) and third[0] not in (first[0], second[0])
        assert lease(0) is None                 # without or_next, step 0 stays empty
        assert lease(1)[1:] == (1, 0)
        assert lease(1, or_next=True) is None   # there is no step 2


@pytest.mark.timeout(60)
def test_or_next_steals_in_its_own_step_before_it_looks_at_the_next(tmp_path):
    # Two workers (both this test), one step of two tasks, one each. Worker 0, idle after
    # its own task, asks with or_next: worker 1's untouched task of step 0 comes first.
    with BareScheduler(tmp_path, workers=2, steps=2, tasks_per_step=2) as cluster:
        workers = cluster.register(samples=8)

        def lease(worker, step, or_next=False):
            peer, inc = workers[worker]
            answer, _ = peer.request(Kind.LEASE, 10, worker=worker, inc=inc, step=step,
                                     or_next=or_next)
            return answer["task"]

        own = lease(0, 0)
        stolen = lease(0, 0, or_next=True)
        assert own[1] == stolen[1] == 0 and own[0] != stolen[0]
        assert lease(1, 0, or_next=True)[1] == 1   # step 0 is empty now: worker 1's next
