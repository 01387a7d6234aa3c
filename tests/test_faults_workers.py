"""Worker failures: nothing is lost, nothing is applied twice, BSP stays exact.

Each test injects one failure into a BSP run and asserts that the final parameters
equal the no-fault run's (the single-process oracle, to a relative 1e-5), that every
epoch's applied samples equal the data set's size, and that the run ends.
Crash points are exact (the worker's --crash-at hook); kills and pauses by the
launcher land on a step the test names (tasks are slowed to ~20 ms so the
launcher's 0.1 s progress polling can hit them).
"""
import os

import numpy as np
import pytest

from cluster import JOBS, check_tiny_mlp_run, launch, oracle

JOB = os.path.join(JOBS, "tiny_mlp.py")
STEPS = 60
FAST = ["--dead-after-s", "1.5"]          # detect deaths quickly (3 missed heartbeats)
SLOW_TASKS = {"TINY_MLP_DELAY_S": "0.02"}


@pytest.fixture(scope="module")
def reference():
    return oracle(JOB, STEPS)


def check(run, reference, deaths):
    return check_tiny_mlp_run(run, reference, STEPS, deaths)


@pytest.mark.parametrize("point", [pytest.param("before_push", marks=pytest.mark.slow), "mid_push",
                                   pytest.param("after_push", marks=pytest.mark.slow)])
def test_worker_crash_at_a_precise_point(tmp_path, reference, point):
    # mid_push: shard 0 has the dead worker's gradient, shard 1 never gets it; shard 0
    # completes the step, shard 1 waits, the task is computed again on version 20.
    # --no-steal: worker 1 surely holds two tasks of step 20 (stealing might leave it none)
    run = launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "2", "--steps", str(STEPS),
                 "--tasks-per-step", "6", "--no-steal", "--crash-at", f"1:{point}@20", *FAST)
    summary = check(run, reference, deaths=1)
    assert "worker1 exited with status -9" in run.stderr
    if point == "mid_push":
        assert summary["duplicates_rejected"] >= 1           # shard 0 refused the redo


@pytest.mark.slow
def test_same_worker_killed_three_times_with_replacements(tmp_path, reference):
    # The others steal a dead worker's queued tasks, so the run need not slow down until
    # the death is detected (1.5 s); each kill must still find the previous replacement
    # joined: 22 steps of at least 80 ms apart (a kill landing on a replacement that has
    # not registered yet would kill a process the scheduler never knew).
    run = launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "2", "--steps", str(STEPS),
                 "--inject", "kill:worker1@step=8", "--inject", "kill:worker1@step=30",
                 "--inject", "kill:worker1@step=52", "--respawn", *FAST,
                 env={"TINY_MLP_DELAY_S": "0.08"}, timeout_s=150)
    summary = check(run, reference, deaths=3)
    assert len(summary["rejoins"]) >= 2                        # replacements joined mid-run
    assert all(r["worker"] == 1 for r in summary["rejoins"])
    assert [f["fired_at_s"] is not None for f in summary["faults_injected"]] == [True] * 3


@pytest.mark.slow
def test_replacement_joins_mid_run_and_does_work(tmp_path, reference):
    run = launch(tmp_path, "--job", JOB, "--workers", "2", "--servers", "2", "--steps", str(STEPS),
                 "--inject", "kill:worker1@step=10", "--respawn", *FAST, env=SLOW_TASKS)
    summary = check(run, reference, deaths=1)
    (rejoin,) = summary["rejoins"]
    assert 10 <= rejoin["start_step"] < STEPS
    assert summary["per_worker"][1]["step"] > rejoin["start_step"]   # it reported work


@pytest.mark.slow
def test_worker_paused_past_the_timeout_is_fenced(tmp_path, reference):
    # 50 steps of 60 ms remain after the pause begins: the worker wakes mid-run
    run = launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "2", "--steps", str(STEPS),
                 "--inject", "pause:worker1@step=10,for=2.5s", *FAST,
                 env={"TINY_MLP_DELAY_S": "0.06"})
    check(run, reference, deaths=1)
    assert "worker1 exited with status 3" in run.stderr        # woke up, learnt it was fenced


@pytest.mark.slow
def test_worker_paused_shorter_than_the_timeout_changes_nothing(tmp_path, reference):
    run = launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "2", "--steps", str(STEPS),
                 "--inject", "pause:worker1@step=10,for=0.5s", "--dead-after-s", "3",
                 env=SLOW_TASKS)
    summary = check(run, reference, deaths=0)
    assert summary["faults_injected"][0]["fired_at_s"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ssp", "asp"])
def test_ssp_and_asp_survive_a_worker_crash_applying_every_sample_once(tmp_path, mode):
    # mid_push: shard 0 applied the dead worker's push, shard 1 never got it; the tasks
    # are dealt again, shard 0 refuses the redo and shard 1 applies it. No oracle here
    # (the order of updates is the run's), so the shards' own counters are the evidence.
    # --no-steal: worker 1 surely holds tasks of clock 20 (stolen, they would leave it a
    # push of none: shard 0 would advance its clock and have nothing to refuse)
    run = launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "2", "--steps", str(STEPS),
                 "--tasks-per-step", "6", "--mode", mode, "--staleness", "1", "--no-steal",
                 "--crash-at", "1:mid_push@20", *FAST)
    assert run.rc == 0, run.stderr[-4000:]
    summary = run.summary
    assert len(summary["deaths"]) == 1
    assert "worker1 exited with status -9" in run.stderr
    applied = [e["samples_applied"] for e in summary["per_epoch"]]        # the scheduler's tally
    assert applied == [200] * 6 + [6 * 24], applied
    # Each shard's side: every task dealt applied exactly once (a task applied twice
    # would count twice), and shard 0 refused the redo of what it already had.
    dealt = STEPS * 6
    assert [s["tasks_applied"] for s in summary["shards"]] == [dealt, dealt], summary["shards"]
    assert summary["shards"][0]["duplicates_rejected"] >= 1
    assert all(np.isfinite(p).all() for p in run.params.values())
