"""Dealing when workers die and come back (ps.core.dealer failure paths), as pure logic.

What failover (``ps.reliability.worker_failover``) relies on: ``reassign`` takes every task a dead worker
leased and puts it at the *front* of a live worker's deque in the task's own round
(reopening a round that had been emptied), marks it ``redo`` and returns it; the
dead worker's queued tasks go to live workers; from then on the dead worker is dealt
nothing, until ``revive`` deals to it again as a worker of unknown speed. Nothing is
lost or duplicated on the way: ``unfinished`` is unchanged by a reassign, and every
task is still leased exactly once.
"""
import itertools

import pytest

from ps.core.dealer import Dealer, steal_count
from ps.core.tasks import TaskPlan


def plan(n=96, b=48, t=12):
    return TaskPlan(num_samples=n, batch_size=b, tasks_per_step=t, shuffle=False)


def ids(tasks):
    return [t.id for t in tasks]


def queues(d, rnd):
    return [ids(q) for q in d.deques[rnd]]


def three_workers_two_rounds():
    """Rounds 0 and 1 dealt round-robin to 3 workers; worker 1 holds 1 and 4 (round 0)
    and 13 (round 1), worker 0 holds 0."""
    d = Dealer(plan(), num_workers=3, total_steps=2)
    d.deal(0)
    d.deal(1)
    assert queues(d, 0) == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    assert queues(d, 1) == [[12, 15, 18, 21], [13, 16, 19, 22], [14, 17, 20, 23]]
    d.take(1, [0], [0])
    d.take(1, [0], [0])
    d.take(1, [1], [1])                   # SSP: worker 1 is a clock ahead
    d.take(0, [0], [0])
    assert sorted(d.leases) == [0, 1, 4, 13]
    return d


# -- reassign ------------------------------------------------------------------------------

def test_reassign_puts_leased_tasks_at_the_front_of_live_deques_in_their_own_round():
    d = three_workers_two_rounds()
    redone = d.reassign(1, [0, 2])
    assert sorted(ids(redone)) == [1, 4, 13]
    assert d.redo == {1, 4, 13}
    assert d.gone == {1}
    assert {tid: w for tid, (w, _) in d.leases.items()} == {0: 0}       # only the live lease stays
    # leased ones to the front (in id order per deque), queued ones to the back, round-robin
    assert queues(d, 0) == [[1, 3, 6, 9, 7], [], [4, 2, 5, 8, 11, 10]]
    assert queues(d, 1) == [[13, 12, 15, 18, 21, 16, 22], [], [14, 17, 20, 23, 19]]


def test_reassign_returns_the_task_objects_that_were_leased():
    d = three_workers_two_rounds()
    leased = {tid: task for tid, (w, task) in d.leases.items() if w == 1}
    redone = d.reassign(1, [0, 2])
    assert all(task is leased[task.id] for task in redone) and len(redone) == 3


def test_a_live_worker_takes_the_redo_tasks_first():
    d = three_workers_two_rounds()
    d.reassign(1, [0, 2])
    assert d.take(0, [0], [0])[0].id == 1
    assert d.take(2, [0], [0])[0].id == 4
    assert d.take(0, [1], [1])[0].id == 13


def test_reassign_of_a_worker_that_held_nothing_moves_its_queue_and_returns_nothing():
    d = Dealer(plan(), num_workers=3, total_steps=1)
    d.deal(0)
    assert d.reassign(2, [0, 1]) == []
    assert d.redo == set()
    assert queues(d, 0) == [[0, 3, 6, 9, 2, 8], [1, 4, 7, 10, 5, 11], []]


def test_an_emptied_round_is_reopened_for_the_redo():
    p = plan(n=16, b=16, t=4)
    d = Dealer(p, num_workers=2, total_steps=2)
    d.deal(0)
    for worker in (0, 0, 1, 1):
        d.take(worker, [0], [0])
    assert 0 not in d.deques and d.left(0) == 0                          # every task leased
    redone = d.reassign(1, [0])
    assert sorted(ids(redone)) == [1, 3]
    assert queues(d, 0) == [[1, 3], []]
    assert d.left(0) == 2
    d.deal(0)                                                           # dealt once: no re-deal
    assert queues(d, 0) == [[1, 3], []]
    assert [d.take(0, [0], [0])[0].id for _ in range(2)] == [1, 3]
    assert d.take(0, [0], [0]) == (None, None) and 0 not in d.deques


def test_asp_redo_goes_back_to_its_epoch():
    p = plan(n=64, b=16, t=2)                                           # 4 steps an epoch
    d = Dealer(p, num_workers=2, total_steps=8, per_epoch=True)
    d.deal(0)
    d.deal(1)
    task, _ = d.take(1, [1], [1])                                       # epoch 1, step 4
    assert (task.id, task.step) == (9, 4)
    d.reassign(1, [0])
    assert ids(d.deques[1][0])[0] == 9
    assert 9 not in ids(d.deques[0][0])


# -- after a death -----------------------------------------------------------------------------

def test_a_dead_worker_is_dealt_nothing_in_new_rounds():
    d = Dealer(plan(), num_workers=3, total_steps=3)
    d.deal(0)
    d.reassign(1, [0, 2])
    d.deal(1)
    tasks = ids(plan().tasks(1))
    assert queues(d, 1) == [tasks[0::2], [], tasks[1::2]]             # equal, speeds unknown


def test_a_dead_worker_is_dealt_nothing_with_known_speeds_either():
    d = Dealer(plan(), num_workers=3, total_steps=3)
    d.speeds = [2.0, 5.0, 1.0]
    d.reassign(1, [0, 2])
    d.deal(0)
    assert [len(q) for q in d.deques[0]] == [8, 0, 4]                  # 2 : 1 between the living


def test_a_revived_worker_is_dealt_again_in_equal_shares():
    d = Dealer(plan(), num_workers=3, total_steps=3)
    d.speeds = [2.0, 5.0, 1.0]
    d.reassign(1, [0, 2])
    d.revive(1)
    assert d.gone == set() and d.speeds[1] is None
    d.deal(0)
    tasks = ids(plan().tasks(0))
    assert queues(d, 0) == [tasks[0::3], tasks[1::3], tasks[2::3]]   # its speed is unknown


def test_a_revived_worker_steals_in_a_round_dealt_while_it_was_dead():
    d = Dealer(plan(), num_workers=3, total_steps=2)
    d.deal(0)
    d.reassign(1, [0, 2])                                              # 6 each for 0 and 2
    d.take(2, [0], [0])
    d.revive(1)
    task, victim = d.take(1, [0], [0])
    assert victim == 0                                                 # the most loaded deque
    assert d.stolen_by == [0, 3, 0] and d.stolen_from == [3, 0, 0]   # half of 6, equal speeds
    assert d.leases[task.id][0] == 1


def test_unfinished_counts_leases_and_queued_tasks_and_a_reassign_keeps_it():
    d = three_workers_two_rounds()
    assert d.unfinished() == 24                                        # 4 leased + 20 queued
    d.reassign(1, [0, 2])
    assert d.unfinished() == 24
    assert len(d.leases) == 1
    done = [d.take(0, [0], [0])[0].id for _ in range(3)]
    assert d.unfinished() == 24
    d.complete(done + [0])
    assert d.unfinished() == 20
    d.complete(done)                                                   # completing twice: no change
    assert d.unfinished() == 20


def test_every_task_is_leased_once_by_the_living_after_a_death():
    d = Dealer(plan(), num_workers=3, total_steps=2)
    d.deal(0)
    d.deal(1)
    taken = {0: [], 1: [], 2: []}
    for worker in (0, 1, 2, 1, 1, 0):
        taken[worker].append(d.take(worker, [0, 1], [0, 1])[0].id)
    pushed = taken[0][:1] + taken[2]
    d.complete(pushed)                                                 # these pushes arrived
    redone = d.reassign(1, [0, 2])
    assert sorted(ids(redone)) == sorted(taken[1])                     # none of its pushes did
    done = set(pushed)
    while True:                                                        # the living drain both rounds
        tasks = [d.take(worker, [0, 1], [0, 1])[0] for worker in (0, 2)]
        tasks = [t for t in tasks if t is not None]
        if not tasks:
            break
        for task in tasks:
            assert task.id not in done and d.leases[task.id][0] != 1
            done.add(task.id)
            d.complete([task.id])
    assert d.unfinished() == 1 and list(d.leases) == [taken[0][1]]    # worker 0 still computing it
    done.update(ids(d.complete([taken[0][1]])))
    assert done == set(range(24)) and d.unfinished() == 0


# -- steal_count ---------------------------------------------------------------------------------

@pytest.mark.parametrize("thief,owner", itertools.product([0.01, 0.25, 1.0, 4.0, 100.0], repeat=2))
def test_steal_count_never_exceeds_what_is_left(thief, owner):
    for left in range(0, 41):
        assert 0 <= steal_count(left, thief, owner) <= left


def test_a_fast_thief_takes_everything_from_a_stalled_owner():
    assert steal_count(5, 100.0, 0.01) == 5
    assert steal_count(0, 100.0, 0.01) == 0
