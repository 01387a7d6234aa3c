"""Work stealing on a live cluster: a slow worker does less, and nothing is lost.

With one worker 4x slow, the fast workers take its tasks; every epoch's applied
samples still equal the data set's size, no duplicate is applied, and in BSP the
final parameters still equal single-process torch on the same global batches.
"""
import json
import os

import pytest

from cluster import JOBS, assert_params_close, launch, oracle

JOB = os.path.join(JOBS, "tiny_mlp.py")
STEPS = 60                     # 6 epochs of 9 steps (200 samples), then 6 steps of 24
# 12 tasks a step, but the short last step of an epoch (8 samples) has only 8
TASKS = 6 * (8 * 12 + 8) + 6 * 12


def check_every_sample_once(summary):
    epochs = summary["per_epoch"]
    assert [e["samples_applied"] for e in epochs] == [200] * 6 + [6 * 24]
    assert all(e["duplicates_rejected"] == 0 for e in epochs)
    assert summary["duplicates_rejected"] == 0


def test_bsp_with_a_4x_slow_worker_equals_the_oracle(tmp_path):
    run = launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "2", "--steps", str(STEPS),
                 "--tasks-per-step", "12", "--slow", "1=4")
    assert run.rc == 0, run.stderr[-3000:]
    summary = run.summary
    tasks = [w["tasks"] for w in summary["per_worker"]]
    assert tasks[1] < min(tasks[0], tasks[2]), tasks          # the straggler did less
    assert summary["per_worker"][1]["stolen_from"] > 0
    assert sum(tasks) == TASKS                                # every task done once
    check_every_sample_once(summary)
    assert_params_close(run.params, oracle(JOB, STEPS), rtol=1e-5)


@pytest.mark.slow
def test_no_steal_deals_equal_shares(tmp_path):
    run = launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "1", "--steps", str(STEPS),
                 "--tasks-per-step", "12", "--slow", "1=4", "--no-steal")
    assert run.rc == 0, run.stderr[-3000:]
    summary = run.summary
    tasks = [w["tasks"] for w in summary["per_worker"]]
    assert sum(tasks) == TASKS and max(tasks) - min(tasks) <= 6 * 2     # round-robin shares
    assert all(w["stolen_by"] == w["stolen_from"] == 0 for w in summary["per_worker"])
    check_every_sample_once(summary)
    assert_params_close(run.params, oracle(JOB, STEPS), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ssp", "asp"])
def test_ssp_and_asp_with_a_slow_worker_apply_every_sample_once(tmp_path, mode):
    run = launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "2", "--steps", str(STEPS),
                 "--tasks-per-step", "12", "--slow", "1=4", "--mode", mode, "--staleness", "1")
    assert run.rc == 0, run.stderr[-3000:]
    summary = run.summary
    tasks = [w["tasks"] for w in summary["per_worker"]]
    assert tasks[1] < min(tasks[0], tasks[2]), tasks
    check_every_sample_once(summary)
    if mode == "ssp":
        assert summary["max_staleness"] <= 1


@pytest.mark.slow
def test_trace_records_tasks_and_steals(tmp_path):
    run = launch(tmp_path, "--job", JOB, "--workers", "2", "--servers", "1", "--steps", "20",
                 "--tasks-per-step", "8", "--slow", "1=4", "--trace")
    assert run.rc == 0, run.stderr[-3000:]
    with open(tmp_path / "trace.json") as f:
        events = json.load(f)["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert {"scheduler", "worker0", "worker1"} <= names
    tasks = [e for e in events if e["ph"] == "X" and e["name"] == "task"]
    # a span per pass over the tasks computed together (a fused lease): every task in one
    assert sorted(t for e in tasks for t in e["args"]["tasks"]) == list(range(20 * 8))
    assert all(e["dur"] > 0 and e["args"]["task"] == e["args"]["tasks"][0] for e in tasks)
    steals = [e for e in events if e["name"] == "steal"]
    assert steals                                                      # at least one steal
    assert sum(e["args"]["tasks"] for e in steals) == sum(
        w["stolen_by"] for w in run.summary["per_worker"])
