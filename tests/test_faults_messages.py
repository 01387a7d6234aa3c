"""Lost, duplicated and delayed messages: retried by id, applied once, BSP stays exact.

Every role's transport drops 2% of what it sends, duplicates 2% and delays all of it
(``--inject drop:0.02 --inject dup:0.02 --inject delay:1ms``, seeded). Requests are
resent with the same id (Lazy Pirate) and every handler answers a repeat with its
first answer, so: the BSP run ends with the oracle's parameters, every epoch's
samples are applied exactly once, and no duplicate push is applied.
"""
import os
import time

import pytest

from cluster import JOBS, assert_params_close, launch, oracle
from live import BareScheduler

from ps.wire.protocol import Kind
from ps.scheduler.scheduler import DONE_GRACE_S

JOB = os.path.join(JOBS, "tiny_mlp.py")
STEPS = 60
NOISY = ["--inject", "drop:0.02", "--inject", "dup:0.02", "--inject", "delay:1ms"]


def test_bsp_with_lost_duplicated_and_delayed_messages_equals_the_oracle(tmp_path):
    run = launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "2", "--steps", str(STEPS),
                 "--tasks-per-step", "6", *NOISY, timeout_s=150)
    assert run.rc == 0, run.stderr[-4000:]
    summary = run.summary
    assert [e["samples_applied"] for e in summary["per_epoch"]] == [200] * 6 + [6 * 24]
    assert summary["deaths"] == []
    assert_params_close(run.params, oracle(JOB, STEPS), rtol=1e-5)


@pytest.mark.parametrize("mode", ["ssp", "asp"])
def test_ssp_and_asp_with_message_faults_apply_every_sample_once(tmp_path, mode):
    run = launch(tmp_path, "--job", JOB, "--workers", "2", "--servers", "2", "--steps", "30",
                 "--tasks-per-step", "4", "--mode", mode, *NOISY, timeout_s=150)
    assert run.rc == 0, run.stderr[-4000:]
    summary = run.summary
    assert [e["samples_applied"] for e in summary["per_epoch"]] == [200] * 3 + [3 * 24]
    # A push duplicated on the wire, or resent, is answered from the cache: it never even
    # reaches the task-id dedupe, and each shard applied exactly one push per task (ASP)
    # or per worker and clock (SSP).
    assert summary["duplicates_rejected"] == 0
    expected = 30 * 4 if mode == "asp" else 30 * 2
    assert [s["pushes_applied"] for s in summary["shards"]] == [expected, expected]


@pytest.mark.timeout(60)
def test_the_scheduler_stays_to_answer_done_again_after_the_servers_left(tmp_path):
    # A worker whose DONE answer is lost asks again (same rid) and is answered from the
    # scheduler's cache, if the scheduler is still there: it stays DONE_GRACE_S after its
    # DONE answers, even when every server said bye sooner. This test is the only worker.
    with BareScheduler(tmp_path, workers=1, steps=1, tasks_per_step=1) as cluster:
        [(peer, inc)] = cluster.register(samples=4)
        task = peer.request(Kind.LEASE, 10, worker=0, inc=inc, step=0)[0]["task"]
        peer.request(Kind.REPORT, 10, worker=0, inc=inc, step=0, tasks=[task[0]], rejected=[],
                     loss_sum=1.0, samples=4, compute_s=0.01, wait_s=0.0)
        assert peer.request(Kind.DONE, 10, worker=0, inc=inc)[0]["finisher"] is True
        answered = time.monotonic()
        peer.request(Kind.FINISHED, 10, worker=0, inc=inc)
        assert cluster.proc.wait(20) == 0
        assert time.monotonic() - answered >= DONE_GRACE_S - 0.1
