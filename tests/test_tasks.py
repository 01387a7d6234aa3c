"""Tasks (ps.core.tasks): the deterministic data stream and the dealing of its tasks.

What the rest of the system relies on: step k of an epoch is batch k of that epoch's
order (the last one possibly smaller), the tasks of a step partition its batch exactly,
task ids never repeat, the order is a pure function of (seed, epoch), and ``num_tasks``
says how many tasks a step has (a shard waits for exactly that many in BSP).
"""
import numpy as np
import pytest

from ps.core.tasks import Task, TaskPlan, epoch_order, steps_per_epoch


def all_samples(plan: TaskPlan, steps) -> list[int]:
    return [int(i) for step in steps for i in plan.batch(step)]


# -- epoch order ----------------------------------------------------------------------

def test_epoch_order_without_shuffle_is_identity():
    order = epoch_order(7, epoch=3, seed=9, shuffle=False)
    assert order.tolist() == list(range(7))


def test_shuffled_order_is_a_deterministic_permutation():
    a = epoch_order(1000, epoch=2, seed=5, shuffle=True)
    assert sorted(a.tolist()) == list(range(1000))
    assert np.array_equal(a, epoch_order(1000, epoch=2, seed=5, shuffle=True))
    assert not np.array_equal(a, np.arange(1000))


def test_shuffled_order_differs_between_epochs_and_seeds():
    base = epoch_order(1000, epoch=0, seed=0, shuffle=True)
    assert not np.array_equal(base, epoch_order(1000, epoch=1, seed=0, shuffle=True))
    assert not np.array_equal(base, epoch_order(1000, epoch=0, seed=1, shuffle=True))
    # (seed, epoch) is a pair, not a sum: (0, 1) and (1, 0) are different streams.
    assert not np.array_equal(epoch_order(1000, 1, 0, True), epoch_order(1000, 0, 1, True))


@pytest.mark.parametrize("n,b,expected", [(10, 4, 3), (12, 4, 3), (1, 4, 1), (4, 1, 4)])
def test_steps_per_epoch_rounds_up(n, b, expected):
    assert steps_per_epoch(n, b) == expected


# -- plan: batches --------------------------------------------------------------------

def test_unshuffled_step_k_covers_kB_to_k1B_and_last_batch_is_smaller():
    plan = TaskPlan(num_samples=10, batch_size=4, tasks_per_step=2, shuffle=False)
    assert plan.steps_per_epoch == 3
    assert plan.batch(0).tolist() == [0, 1, 2, 3]
    assert plan.batch(1).tolist() == [4, 5, 6, 7]
    assert plan.batch(2).tolist() == [8, 9]                   # the epoch's last, smaller batch


def test_steps_continue_into_the_next_epoch():
    plan = TaskPlan(num_samples=10, batch_size=4, tasks_per_step=2, shuffle=False)
    assert [plan.batch(s).tolist() for s in (3, 4, 5, 6)] == \
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_shuffled_epoch_is_a_permutation_split_into_batches(epoch):
    plan = TaskPlan(num_samples=103, batch_size=10, tasks_per_step=3, seed=4)
    steps = range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
    samples = all_samples(plan, steps)
    assert sorted(samples) == list(range(103))                # every sample exactly once
    assert samples == epoch_order(103, epoch, 4, True).tolist()
    assert [len(plan.batch(s)) for s in steps] == [10] * 10 + [3]


def test_plan_is_deterministic_and_revisiting_an_epoch_gives_the_same_batches():
    a = TaskPlan(num_samples=50, batch_size=8, tasks_per_step=2, seed=11)
    b = TaskPlan(num_samples=50, batch_size=8, tasks_per_step=2, seed=11)
    first = [a.batch(s).tolist() for s in range(21)]          # three epochs
    assert first == [b.batch(s).tolist() for s in range(21)]
    assert [a.batch(s).tolist() for s in (0, 14, 1, 7)] == [first[0], first[14], first[1], first[7]]


def test_shuffled_epochs_and_seeds_differ():
    a = TaskPlan(num_samples=50, batch_size=50, tasks_per_step=1, seed=0)
    b = TaskPlan(num_samples=50, batch_size=50, tasks_per_step=1, seed=1)
    assert a.batch(0).tolist() != a.batch(1).tolist()
    assert a.batch(0).tolist() != b.batch(0).tolist()


@pytest.mark.parametrize("kwargs", [dict(num_samples=0, batch_size=1, tasks_per_step=1),
                                    dict(num_samples=1, batch_size=0, tasks_per_step=1),
                                    dict(num_samples=1, batch_size=1, tasks_per_step=0)])
def test_plan_refuses_non_positive_sizes(kwargs):
    with pytest.raises(ValueError):
        TaskPlan(**kwargs)


# -- plan: tasks ----------------------------------------------------------------------

@pytest.mark.parametrize("n,b,t", [(10, 4, 2), (103, 10, 3), (20, 7, 7), (5, 5, 8), (9, 4, 3)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_tasks_partition_their_batch_exactly(n, b, t, shuffle):
    plan = TaskPlan(num_samples=n, batch_size=b, tasks_per_step=t, seed=3, shuffle=shuffle)
    for step in range(2 * plan.steps_per_epoch):
        batch = plan.batch(step).tolist()
        tasks = plan.tasks(step)
        assert [i for task in tasks for i in task.samples] == batch   # in order, no gap/overlap
        assert len(tasks) == min(t, len(batch))
        sizes = [len(task.samples) for task in tasks]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert all(task.step == step for task in tasks)
        assert all(type(i) is int for task in tasks for i in task.samples)


def test_task_ids_are_unique_across_steps_and_follow_the_formula():
    plan = TaskPlan(num_samples=23, batch_size=5, tasks_per_step=3, seed=2)
    ids = []
    for step in range(15):
        tasks = plan.tasks(step)
        assert [t.id for t in tasks] == [step * 3 + j for j in range(len(tasks))]
        ids += [t.id for t in tasks]
    assert len(ids) == len(set(ids))


def test_task_to_wire_is_plain_lists():
    assert Task(7, 2, (4, 5)).to_wire() == [7, 2, [4, 5]]


def test_task_size_and_valid_ids_need_no_cut_of_the_step():
    p = TaskPlan(num_samples=97, batch_size=31, tasks_per_step=6, seed=1)
    for step in range(3 * p.steps_per_epoch):
        for task in p.tasks(step):
            assert p.task_size(task.id) == len(task.samples)
    last = p.steps_per_epoch - 1                  # 97 = 3 x 31 + 4: the last batch has 4 samples
    assert p.num_tasks(last) == 4 and p.task_size(last * 6 + 4) is None
    steps = 2 * p.steps_per_epoch
    assert p.valid_ids([0, 5, last * 6 + 3], steps)
    assert not p.valid_ids([last * 6 + 4], steps)      # no such task in a short step
    assert not p.valid_ids([steps * 6], steps)         # past the run's last step
    assert not p.valid_ids([-1], steps)


def test_a_coarser_grain_keeps_the_ids_stride_and_covers_the_same_samples():
    p = TaskPlan(num_samples=100, batch_size=30, tasks_per_step=6, shuffle=False)
    fine = p.tasks(1)
    p.set_grain(1, 2)
    coarse = p.tasks(1)
    assert [t.id for t in coarse] == [6, 7]                       # the step's first ids
    assert sorted(s for t in coarse for s in t.samples) == sorted(s for t in fine for s in t.samples)
    assert [p.task_size(t.id) for t in coarse] == [15, 15] and p.task_size(8) is None
    assert p.ids(1) == [6, 7] and p.num_tasks(1) == 2 and p.num_tasks(0) == 6
    p.set_grain(1, 6)                                             # back to the finest cut
    assert p.tasks(1) == fine and p.grain == {}
    with pytest.raises(ValueError):
        p.set_grain(2, 7)
    with pytest.raises(ValueError):
        p.set_grain(2, 0)
