"""Run accounting (ps.scheduler.runstate.RunState): the numbers that end up in summary.json.

A step's loss is the mean over its samples, so reports from workers that did unequal
amounts of work are weighted by their sample counts, not averaged per report.
"""
import pytest

from ps.scheduler.runstate import RunState


def report(state, worker, step, samples, loss_sum, tasks=1, compute_s=0.5, wait_s=0.25):
    state.report(worker, step, tasks, samples, loss_sum, compute_s, wait_s)


def test_step_loss_is_sample_weighted():
    state = RunState(steps=2, num_workers=2, steps_per_epoch=2)
    report(state, 0, 0, samples=1, loss_sum=1.0)              # mean 1.0 over 1 sample
    report(state, 1, 0, samples=3, loss_sum=9.0)              # mean 3.0 over 3 samples
    report(state, 0, 1, samples=2, loss_sum=1.0)
    assert state.losses() == [pytest.approx(10.0 / 4), pytest.approx(0.5)]
    assert state.last_loss() == pytest.approx(0.5)


def test_losses_are_in_step_order_and_zero_sample_reports_add_no_loss():
    state = RunState(steps=3, num_workers=2, steps_per_epoch=3)
    report(state, 0, 2, samples=4, loss_sum=4.0)
    report(state, 1, 0, samples=2, loss_sum=6.0)
    report(state, 1, 1, samples=0, loss_sum=0.0, tasks=0)     # an SSP clock tick: no samples
    assert state.losses() == [pytest.approx(3.0), pytest.approx(1.0)]
    assert state.last_loss() == pytest.approx(1.0)


def test_per_worker_tallies():
    state = RunState(steps=3, num_workers=3, steps_per_epoch=3)
    report(state, 0, 0, samples=5, loss_sum=1.0, tasks=2, compute_s=1.0, wait_s=0.5)
    report(state, 0, 2, samples=3, loss_sum=1.0, tasks=1, compute_s=2.0, wait_s=0.25)
    report(state, 0, 1, samples=4, loss_sum=1.0, tasks=1, compute_s=0.5, wait_s=0.0)
    report(state, 2, 0, samples=7, loss_sum=1.0, tasks=3, compute_s=0.0, wait_s=1.0)
    w0, w1, w2 = state.workers
    assert (w0.samples, w0.tasks, w0.step) == (12, 4, 2)     # step: the latest, not the last sent
    assert (w0.compute_s, w0.wait_s) == pytest.approx((3.5, 0.75))
    assert (w1.samples, w1.tasks, w1.step, w1.done) == (0, 0, -1, False)
    assert (w2.samples, w2.tasks, w2.step) == (7, 3, 0)
    assert state.samples() == 19
    per_worker = state.summary([0, 1, 2], [2, 1, 0])["per_worker"]
    assert [w["worker"] for w in per_worker] == [0, 1, 2]
    assert per_worker[0]["samples"] == 12 and per_worker[2]["tasks"] == 3
    assert [(w["stolen_by"], w["stolen_from"]) for w in per_worker] == [(0, 2), (1, 1), (2, 0)]


def test_per_epoch_counts_applied_samples_and_rejected_duplicates():
    state = RunState(steps=4, num_workers=2, steps_per_epoch=2)
    state.count_task(1, 0, 5, rejected=False)
    state.count_task(2, 0, 3, rejected=False)
    state.count_task(1, 0, 5, rejected=True)       # a duplicate adds no samples
    state.count_task(3, 1, 4, rejected=False)
    assert state.summary([0, 0], [0, 0])["per_epoch"] == [
        {"epoch": 0, "samples_applied": 8, "duplicates_rejected": 1},
        {"epoch": 1, "samples_applied": 4, "duplicates_rejected": 0}]


def test_diagnose_names_exactly_the_unfinished_workers():
    state = RunState(steps=4, num_workers=3, steps_per_epoch=2)
    report(state, 0, 3, samples=1, loss_sum=0.0)
    report(state, 1, 1, samples=1, loss_sum=0.0)
    state.done(0)
    text = state.diagnose()
    assert "worker 0" not in text
    assert "worker 1 (last reported step 1)" in text
    assert "worker 2 (last reported step -1)" in text
    assert not state.all_done()
    state.done(1)
    state.done(2)
    assert state.all_done()
    assert "worker " not in state.diagnose()                     # nobody is named


def test_progress_and_summary_before_and_after_work():
    state = RunState(steps=4, num_workers=2, steps_per_epoch=2)
    assert state.last_loss() is None and state.losses() == []
    assert state.elapsed() == 0.0
    assert state.progress()["step"] == 0
    state.started()
    report(state, 1, 2, samples=6, loss_sum=3.0)
    state.done(1)
    state.finish()
    progress = state.progress()
    assert progress["step"] == 3 and progress["steps"] == 4
    assert progress["samples"] == 6 and progress["workers_done"] == 1
    assert progress["loss"] == pytest.approx(0.5)
    summary = state.summary([0, 0], [0, 0])
    assert summary["epochs"] == 2.0 and summary["samples"] == 6
    assert summary["final_loss"] == pytest.approx(0.5)
    assert summary["wall_s"] == state.elapsed() >= 0.0           # frozen once finished


def test_a_task_first_known_applied_through_a_refused_push_counts_once():
    state = RunState(steps=2, num_workers=2, steps_per_epoch=2)
    state.count_task(7, 0, 5, rejected=True)       # pushed by a worker that died unreported
    state.count_task(7, 0, 5, rejected=True)
    assert state.summary([0, 0], [0, 0])["per_epoch"] == [
        {"epoch": 0, "samples_applied": 5, "duplicates_rejected": 2}]
