"""Scheduler failures: the scheduler is killed, started again from its journal, and the run
ends as if nothing happened.

Each test kills the scheduler (SIGKILL) at a point it names: its ``--crash-at`` hook
(the first REPORT of a step, journaled but not answered; the K-th registration while
the cluster forms; the moment every worker is done), or the launcher's
``--inject kill:scheduler@step=N``. The launcher starts it again on the same endpoint
with the same journal; servers and workers register again and the run goes on. Each
asserts the final parameters equal the single-process oracle (to a relative 1e-5),
that every epoch's applied samples equal the data set's size, and that the run ends
within its deadline. The last test stalls a worker (alive, heartbeating) and asserts
that the others' blocked pulls name the tasks it holds.
"""
import os

import pytest

from cluster import JOBS, assert_params_close, check_tiny_mlp_run, launch, oracle

JOB = os.path.join(JOBS, "tiny_mlp.py")
STEPS = 60
CLUSTER = ["--job", JOB, "--workers", "3", "--servers", "2", "--steps", str(STEPS),
           "--tasks-per-step", "6", "--dead-after-s", "1.5"]
SLOW_TASKS = {"TINY_MLP_DELAY_S": "0.02"}


@pytest.fixture(scope="module")
def reference():
    return oracle(JOB, STEPS)


def check(run, reference, restarts=1):
    summary = check_tiny_mlp_run(run, reference, STEPS, deaths=0)   # nobody lost on the way
    assert run.stderr.count("starting it again") == 1, run.stderr[-4000:]
    assert len(summary["scheduler_restarts"]) == restarts, summary["scheduler_restarts"]
    return summary


def test_scheduler_killed_mid_step_is_restarted_from_its_journal(tmp_path, reference):
    # Killed with the first report of step 20 journaled but unanswered: the step's other
    # tasks are leased under the dead scheduler; the new one deals them again (redo).
    run = launch(tmp_path, *CLUSTER, "--scheduler-crash-at", "report@20")
    summary = check(run, reference)
    (restart,) = summary["scheduler_restarts"]
    assert restart["members_back"] == 5                      # 2 servers, 3 workers
    assert restart["reform_s"] < 1.5                         # everyone was back within a timeout


@pytest.mark.slow
def test_a_restart_while_the_shards_agree_on_a_norm_loses_no_step(tmp_path):
    # With clipping each step waits on the scheduler for its global norm (NORM): killed on
    # the first NORM of step 20, it leaves shards holding a complete step and resending
    # their parts (whatever the order of the workers' reports and the shards' norms); the
    # restarted scheduler answers them once they have registered again, and the run ends
    # on the single-process loop that clips (and follows the same schedule).
    env = {**SLOW_TASKS, "TINY_MLP_CLIP": "0.6", "TINY_MLP_SCHEDULE": "[4, 30, 0.1]",
           "TINY_MLP_OPTIMIZER": '{"name": "adamw", "lr": 0.02}'}
    want = oracle(JOB, STEPS, env={k: v for k, v in env.items() if k != "TINY_MLP_DELAY_S"})
    run = launch(tmp_path, *CLUSTER, "--scheduler-crash-at", "norm@20", env=env)
    summary = check(run, want)
    assert 0 < summary["clipped_steps"] < STEPS
    # A step was held across the restart: 60 holds take ~0.08 s in all without one, and
    # the restart (detection, a new process, everyone registering again) ~0.5 s more.
    assert all(s["norm_hold"]["steps"] == STEPS and s["norm_hold"]["held_s"] > 0.3
               for s in summary["shards"]), summary["shards"]


@pytest.mark.slow
def test_a_restart_with_the_adaptive_grain_deals_each_round_as_it_was_cut(tmp_path):
    # The other restart tests fix the grain; this one leaves it adaptive, with batches of
    # 100 (at most 6 tasks of >= 16 samples): with no straggler every round is cut into 3
    # tasks, one per worker, not the finest 6, and the restarted scheduler reads each
    # journaled round's cut back (test_journal.py checks that replay itself) and ends on
    # the oracle, every sample applied once.
    flags = [f for f in CLUSTER if f not in ("--tasks-per-step", "6")]
    env = {**SLOW_TASKS, "TINY_MLP_BATCH": "100"}            # 2 steps an epoch of 200
    want = oracle(JOB, STEPS, env={"TINY_MLP_BATCH": "100"})
    run = launch(tmp_path, *flags, "--scheduler-crash-at", "report@20", env=env)
    assert run.rc == 0, run.stderr[-4000:]
    summary = run.summary
    assert len(summary["scheduler_restarts"]) == 1 and summary["tasks_per_step"] == 6
    assert summary["task_grain"]["adaptive"] and summary["task_grain"]["fine_rounds"] == 0
    assert [e["samples_applied"] for e in summary["per_epoch"]] == [200] * (STEPS // 2)
    assert_params_close(run.params, want, rtol=1e-5)


@pytest.mark.slow
def test_scheduler_killed_by_the_launcher_records_detection_and_recovery(tmp_path, reference):
    run = launch(tmp_path, *CLUSTER, "--inject", "kill:scheduler@step=15", env=SLOW_TASKS)
    summary = check(run, reference)
    (fault,) = summary["faults_injected"]
    assert fault["fired_at_s"] <= fault["detected_at_s"] < fault["fired_at_s"] + 1.0
    assert 0 < fault["recovery_s"] < 10, fault


@pytest.mark.slow
def test_scheduler_killed_while_the_cluster_forms(tmp_path, reference):
    # The third REGISTER kills it: nobody has an incarnation yet (replies are held until
    # all have joined); the roles' REGISTER requests are resent to the new scheduler.
    run = launch(tmp_path, *CLUSTER, "--scheduler-crash-at", "register@3")
    check(run, reference, restarts=0)                        # nothing to re-form: it forms


@pytest.mark.slow
def test_scheduler_killed_once_every_worker_is_done(tmp_path, reference):
    # The finisher is named in the journal; the others have not heard DONE answered and
    # ask again; the finisher writes the parameters for the new scheduler.
    run = launch(tmp_path, *CLUSTER, "--scheduler-crash-at", "finishing")
    check(run, reference)


@pytest.mark.slow
def test_a_stalled_worker_is_named_by_the_pulls_that_wait_for_it(tmp_path, reference):
    # Worker 1 stops for 4 s before its push of step 10 (its heartbeats go on, so it is not
    # declared dead); worker 0's pull of step 11 waits on both shards for worker 1's tasks.
    # --no-steal: tasks 41 and 43 of step 10 stay worker 1's.
    run = launch(tmp_path, "--job", JOB, "--workers", "2", "--servers", "2", "--steps", str(STEPS),
                 "--tasks-per-step", "4", "--no-steal", "--crash-at", "1:stall@10")
    assert run.rc == 0, run.stderr[-4000:]
    assert ("step 11 pull waiting on server0 (shard 0 at version 10: missing tasks "
            "41 leased to worker 1, 43 leased to worker 1)") in run.stderr, run.stderr[-4000:]
    assert "no report for" in run.stderr and "leased to worker 1" in run.stderr   # the scheduler's
    assert "pull of step 11 by worker 0 parked" in run.stderr                     # a shard's
    assert_params_close(run.params, reference, rtol=1e-5)
