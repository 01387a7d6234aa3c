"""Dealing, leases and work stealing (ps.core.dealer), as pure logic.

What the rest of the system relies on: every task of a round is leased exactly once,
whoever takes it; a worker takes from the front of its own deque and steals from the
back of the most loaded one, about half with equal speeds and less (or nothing) for
a slow thief; leases end at completion; static dealing never steals.
"""
import pytest

from ps.core.dealer import Dealer, steal_count
from ps.core.tasks import TaskPlan


def plan(n=64, b=16, t=8):
    return TaskPlan(num_samples=n, batch_size=b, tasks_per_step=t, shuffle=False)


def ids(tasks):
    return [t.id for t in tasks]


def test_deal_is_round_robin_until_speeds_are_known_and_happens_once():
    p = plan(t=7)
    d = Dealer(p, num_workers=3, total_steps=4)
    d.deal(0)
    tasks = p.tasks(0)
    assert [list(q) for q in d.deques[0]] == [tasks[0::3], tasks[1::3], tasks[2::3]]
    d.take(1, [0], [0])
    d.deal(0)                                                 # a second deal changes nothing
    assert [len(q) for q in d.deques[0]] == [3, 1, 2]


def test_owner_takes_from_the_front_of_its_own_deque():
    p = plan()
    d = Dealer(p, 2, total_steps=4)
    d.deal(0)
    got = [d.take(0, [0], [0])[0] for _ in range(4)]
    assert ids(got) == ids(p.tasks(0)[0::2])                  # in order, only its own
    assert d.stolen_by == [0, 0]
    assert d.leases == {t.id: (0, t) for t in got}


def test_idle_worker_steals_about_half_from_the_back_of_the_most_loaded_deque():
    p = plan(n=96, b=48, t=12)
    d = Dealer(p, 3, total_steps=2)
    d.deal(0)
    own1 = list(d.deques[0][1])
    for _ in range(4):                                        # worker 0 drains its deque
        d.take(0, [0], [0])
    d.take(2, [0], [0])                                       # worker 2 has 3 left, worker 1 has 4
    task, victim = d.take(0, [0], [0])
    assert victim == 1
    # 4 left: the pair finishes soonest with 2 stolen; the thief gets the back two, in order
    assert d.stolen_by == [2, 0, 0] and d.stolen_from == [0, 2, 0]
    assert task is own1[2] and list(d.deques[0][0]) == [own1[3]]
    assert list(d.deques[0][1]) == own1[:2]                   # the owner keeps its front


@pytest.mark.parametrize("left,expected", [(0, 0), (1, 1), (2, 1), (3, 2), (4, 2), (7, 4)])
def test_steal_count_with_equal_speeds_is_about_half(left, expected):
    assert steal_count(left, 1.0, 1.0) == expected


def test_slow_thief_steals_less_or_nothing():
    assert steal_count(2, 0.25, 1.0) == 0        # it would finish after the owner
    assert steal_count(8, 0.25, 1.0) == 1
    assert steal_count(3, 1.0, 0.25) == 3        # a fast thief empties a straggler's deque


def test_slow_worker_cannot_steal_from_a_fast_one():
    p = plan(n=64, b=64, t=8)
    d = Dealer(p, 2, total_steps=1)
    d.speeds = [4.0, 1.0]                        # worker 1 is 4x slower
    d.deal(0)
    # each task to whoever finishes it first: 7 and 1 end at 1.75 and 1 (6 and 2: at 2)
    assert [len(q) for q in d.deques[0]] == [7, 1]
    d.take(1, [0], [0])
    for _ in range(5):
        d.take(0, [0], [0])                                   # fast worker: 2 left, 0.625 units
    assert d.take(1, [0], [0]) == (None, None)                # a steal would end at 1 unit


def test_a_lease_taken_ahead_never_steals_nor_takes_the_last_task():
    d = Dealer(plan(), 2, total_steps=1)
    d.deal(0)                                                 # 4 tasks each
    for _ in range(3):
        assert d.take_ahead(0, [0]) is not None
    assert d.take_ahead(0, [0]) is None                       # the last stays stealable
    assert len(d.deques[0][0]) == 1
    task, victim = d.take(1, [0], [0])                        # worker 1 takes its own
    assert victim is None and task is not None
    task, victim = d.take(0, [0], [0])                        # idle now: its last task
    assert victim is None and task is not None
    task, victim = d.take(0, [0], [0])                        # deque empty: may steal
    assert victim == 1 and task is not None


def test_a_stragglers_last_task_goes_to_an_idle_thief():
    d = Dealer(plan(n=32, b=32, t=4), 2, total_steps=1)
    d.deal(0)                                                 # 2 tasks each
    slow_first = d.take(1, [0], [0])[0]                       # the slow worker computes one
    assert d.take_ahead(1, [0]) is None                       # ... and cannot hold its last
    assert d.take(0, [0], [0])[0] and d.take(0, [0], [0])[0]  # the fast one does its two
    task, victim = d.take(0, [0], [0])
    assert victim == 1 and task is not None and task is not slow_first
    assert d.take(1, [0], [0]) == (None, None)                # nothing left for the straggler


def test_without_stealing_a_lease_ahead_takes_the_last_task_too():
    d = Dealer(plan(), 2, total_steps=1, steal=False)
    d.deal(0)
    assert all(d.take_ahead(0, [0]) is not None for _ in range(4))
    assert d.take_ahead(0, [0]) is None


def test_every_task_is_leased_exactly_once_whoever_takes_it():
    p = TaskPlan(num_samples=97, batch_size=31, tasks_per_step=6, seed=1)
    d = Dealer(p, 3, total_steps=2 * p.steps_per_epoch)
    order = [2, 2, 0, 2, 1, 2, 2, 2]                          # worker 2 is the fast one
    for step in range(d.total_steps):
        d.deal(step)
        taken, i = [], 0
        while True:
            w = order[i % len(order)]
            task, _ = d.take(w, [step], [step])
            i += 1
            if task is None and all(d.take(x, [step], [step])[0] is None for x in range(3)):
                break
            if task is not None:
                taken.append(task)
        taken += [t for _, t in d.leases.values() if t.step == step and t not in taken]
        assert sorted(ids(taken)) == ids(p.tasks(step))
    assert d.stolen_by[2] > 0
    assert len(d.leases) == sum(len(p.tasks(s)) for s in range(d.total_steps))


def test_complete_ends_leases_and_returns_the_tasks():
    d = Dealer(plan(), 2, total_steps=1)
    d.deal(0)
    a = d.take(0, [0], [0])[0]
    b = d.take(1, [0], [0])[0]
    assert d.complete([a.id, 999]) == [a]                     # unknown ids are ignored
    assert d.complete([a.id]) == []                           # completing twice is harmless
    assert list(d.leases) == [b.id]


def test_no_steal_never_steals_and_ignores_speeds():
    d = Dealer(plan(), 2, total_steps=1, steal=False)
    d.speeds = [4.0, 1.0]
    d.deal(0)
    assert [len(q) for q in d.deques[0]] == [4, 4]
    for _ in range(4):
        d.take(0, [0], [0])
    assert d.take(0, [0], [0]) == (None, None)
    assert d.stolen_by == [0, 0]


def test_asp_rounds_are_epochs_and_stop_at_total_steps():
    p = plan(n=64, b=16, t=2)                                  # 4 steps per epoch
    d = Dealer(p, 2, total_steps=6, per_epoch=True)
    assert d.rounds == 2
    assert list(d.steps_of(0)) == [0, 1, 2, 3] and list(d.steps_of(1)) == [4, 5]
    d.deal(1)
    assert sorted(t.step for q in d.deques[1] for t in q) == [4, 4, 5, 5]


def test_ssp_thief_steals_from_an_older_clock():
    d = Dealer(plan(), 2, total_steps=4)
    for r in (0, 1, 2):
        d.deal(r)
    for r in (0, 1, 2):                                        # worker 0 ran ahead to clock 2
        while d.take(0, [r], [])[0] is not None:
            pass
    task, victim = d.take(0, [0, 1, 2], [0, 1, 2])             # its deques empty: steal
    assert victim == 1 and task.step in (0, 1, 2)


def test_emptied_rounds_are_dropped_but_never_dealt_again():
    d = Dealer(plan(n=16, b=16, t=2), 2, total_steps=1)
    d.deal(0)
    d.take(0, [0], [0])
    d.take(1, [0], [0])
    assert 0 not in d.deques
    d.deal(0)
    assert 0 not in d.deques


def test_own_left_counts_only_the_workers_own_deque_and_tells_its_last_task():
    d = Dealer(plan(), 2, total_steps=2)
    d.deal(0)                                                 # 4 tasks each
    assert d.own_left(0, [0]) == 4 and d.own_left(0, [1]) == 0   # round 1 not dealt
    for _ in range(3):
        d.take_ahead(0, [0])
    assert d.take_ahead(0, [0]) is None and d.own_left(0, [0]) == 1   # withheld: not the last
    d.take(0, [0], [0])                                       # idle: takes its last one
    assert d.take_ahead(0, [0]) is None and d.own_left(0, [0]) == 0   # computing its last
    assert d.own_left(1, [0]) == 4
    d.take(0, [0], [0])                                       # steals 2 of worker 1's 4
    assert d.own_left(0, [0]) == 1 and d.own_left(1, [0]) == 2


def test_a_worker_measured_too_slow_for_any_task_is_dealt_one_every_probe_rounds():
    from ps.core.dealer import PROBE_ROUNDS
    p = plan(n=6 * 40, b=6, t=6)
    d = Dealer(p, 3, total_steps=40)
    d.speeds = [100.0, 100.0, 10.0]            # worker 2 measured 10x slower: no share of 6
    dealt_to_2 = []
    for step in range(2 * PROBE_ROUNDS):
        d.deal(step)
        dealt_to_2.append(len(d.deques[step][2]))
    probes = [PROBE_ROUNDS - 1, 2 * PROBE_ROUNDS - 1]
    assert dealt_to_2 == [1 if s in probes else 0 for s in range(2 * PROBE_ROUNDS)]
    # the probe's task is the last of a busiest worker's share; every task dealt once
    assert sorted(len(q) for q in d.deques[probes[0]][:2]) == [2, 3]
    assert sorted(t.id for q in d.deques[probes[0]] for t in q) == ids(p.tasks(probes[0]))
    for _ in range(3):                         # its reports: not so slow after all
        d.note_speed(2, 100.0)
    d.deal(2 * PROBE_ROUNDS)
    assert len(d.deques[2 * PROBE_ROUNDS][2]) > 0


def test_a_fused_lease_takes_the_front_of_the_own_deque_and_never_a_redo():
    p = plan(n=64, b=16, t=8)                      # 8 tasks of 2 samples per step
    d = Dealer(p, 2, total_steps=4)
    d.deal(0)
    first, _ = d.take(0, [0], [0])
    more = d.take_more(0, first, fuse=64)          # speeds unknown: the last task stays
    assert ids([first] + more) == ids(p.tasks(0)[0:6:2]) and len(d.deques[0][0]) == 1
    assert all(d.leases[t.id][0] == 0 for t in more)
    first, _ = d.take(1, [0], [0])
    assert ids(d.take_more(1, first, fuse=2)) == [p.tasks(0)[3].id]   # at most fuse in all
    d.redo.add(p.tasks(0)[5].id)                   # a task dealt again is pushed alone
    assert d.take_more(1, p.tasks(0)[1], fuse=64) == []


def test_a_fused_lease_keeps_the_last_task_only_for_a_thief_that_would_finish_it_sooner():
    p = plan(n=64, b=16, t=8)
    d = Dealer(p, 2, total_steps=4)
    d.speeds = [10.0, 10.0]                        # balanced: each does its whole share at once
    d.deal(0)
    d.deal(1)                                      # 4 tasks each in both rounds
    first, _ = d.take(0, [0], [0])
    assert len(d.take_more(0, first, fuse=64)) == 3 and not d.deques[0][0]
    d.speeds = [2.0, 10.0]                         # worker 0 turned 5x slower than dealt for
    first, _ = d.take(0, [1], [1])
    assert len(d.take_more(0, first, fuse=64)) == 2 and len(d.deques[1][0]) == 1
    # its last task is there for worker 1, which steals it when idle
    for _ in range(4):
        d.take(1, [1], [1])
    task, victim = d.take(1, [1], [1])
    assert victim == 0 and task.id == p.tasks(1)[6].id


def test_without_stealing_a_fused_lease_takes_the_whole_share():
    p = plan(n=64, b=16, t=8)
    d = Dealer(p, 2, total_steps=4, steal=False)
    d.deal(0)
    first, _ = d.take(0, [0], [0])
    assert len(d.take_more(0, first, fuse=64)) == 3 and not d.deques[0][0]


def test_a_fused_lease_asked_ahead_leaves_the_last_task_and_stays_in_its_step():
    p = plan(n=64, b=16, t=8)
    d = Dealer(p, 2, total_steps=4)
    d.speeds = [10.0, 10.0]                        # balanced: asked when idle, it takes all
    d.deal(0)
    first = d.take_ahead(0, [0])
    assert len(d.take_more(0, first, fuse=64, ahead=True)) == 2 and len(d.deques[0][0]) == 1
    e = Dealer(p, 2, total_steps=4, per_epoch=True)   # ASP-style rounds: an epoch of steps
    e.deal(0)
    first, _ = e.take(0, [0], [0])
    assert {t.step for t in e.take_more(0, first, fuse=64)} == {first.step}


# -- the adaptive grain -----------------------------------------------------------------

def adaptive(workers=2, t=8, steal=True):
    p = plan(n=640, b=64, t=t)
    return p, Dealer(p, workers, total_steps=10, steal=steal, adaptive=True)


def test_adaptive_grain_is_one_task_per_worker_until_speeds_differ():
    p, d = adaptive()
    d.deal(0)                                                 # speeds unknown: coarse
    assert p.num_tasks(0) == 2 and [len(q) for q in d.deques[0]] == [1, 1]
    d.note_speed(0, 100.0)
    d.note_speed(1, 110.0)                                    # within IMBALANCE
    d.deal(1)
    assert p.num_tasks(1) == 2
    d.speeds = [100.0, 300.0]                                 # one worker 3x slower
    d.deal(2)
    assert p.num_tasks(2) == 8 and [len(q) for q in d.deques[2]] == [2, 6]
    assert (d.fine_rounds, d.coarse_rounds) == (1, 2)


def test_adaptive_grain_has_hysteresis_and_follows_deaths():
    p, d = adaptive(workers=3, t=12)
    d.speeds = [100.0, 100.0, 140.0]                          # spread 1.4: fine
    d.deal(0)
    assert p.num_tasks(0) == 12
    d.speeds = [100.0, 100.0, 120.0]                          # 1.2: stays fine (above BALANCED)
    d.deal(1)
    assert p.num_tasks(1) == 12
    d.speeds = [100.0, 100.0, 105.0]                          # 1.05: coarse again
    d.deal(2)
    assert p.num_tasks(2) == 3
    d.reassign(2, [0, 1])                                     # a death: one task per live worker
    d.deal(3)
    assert p.num_tasks(3) == 2 and [len(q) for q in d.deques[3]] == [1, 1, 0]


def test_static_dealing_and_a_fixed_grain_never_change_the_cut():
    p, d = adaptive(steal=False)
    d.speeds = [100.0, 300.0]
    d.deal(0)
    assert p.num_tasks(0) == 2                                # static: equal shares, one each
    p2 = plan(n=640, b=64, t=8)
    d2 = Dealer(p2, 2, total_steps=10)                        # adaptive off: --tasks-per-step
    d2.speeds = [100.0, 100.0]
    d2.deal(0)
    assert p2.num_tasks(0) == 8 and p2.grain == {}


def test_every_task_of_an_adaptive_round_is_leased_exactly_once():
    p, d = adaptive(workers=3, t=12)
    d.speeds = [100.0, 100.0, 400.0]
    d.deal(0)
    got = []
    for _ in range(20):
        for w in range(3):
            task, _ = d.take(w, [0], [0])
            if task is not None:
                got.append(task.id)
    assert sorted(got) == p.ids(0) and len(p.ids(0)) == 12


def test_a_report_may_name_only_tasks_of_rounds_dealt_as_they_were_cut():
    p, d = adaptive()
    d.deal(0)                                                 # coarse: ids 0 and 1
    assert d.knows([0, 1]) and not d.knows([2])               # 2: not in a coarse step 0
    assert not d.knows([8])                                   # step 1 is not dealt yet
    assert not d.knows([10 * 8])                              # past the run's last step
