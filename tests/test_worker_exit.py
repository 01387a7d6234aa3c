"""Workers leave when the run no longer needs them, and a run's success stands.

A worker paused past its death verdict, still paused when the run completes, must not
turn the run's success into a failure: the launcher stops it, in one line, and exits
0 with the oracle's parameters. And a worker whose scheduler is gone (killed, never
restarted) must stop by itself once its heartbeats have gone unanswered for the
scheduler's dead-after time plus a restart allowance, not retry until its --timeout-s.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from cluster import JOBS, ROOT, check_tiny_mlp_run, launch, oracle
from live import BareScheduler
from ps.wire.client import Peer
from ps.wire.protocol import Kind
from worker.heartbeat import RESTART_ALLOWANCE_S

JOB = os.path.join(JOBS, "tiny_mlp.py")
STEPS = 60


@pytest.mark.slow
def test_a_dead_worker_still_paused_when_the_run_ends_is_stopped_and_the_run_succeeds(tmp_path):
    # Worker 2 is paused at step 10 for 60 s: declared dead after 1.5 s, its tasks dealt to
    # the others, the run ends some 3 s later with worker 2 still stopped.
    t0 = time.monotonic()
    run = launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "2", "--steps", str(STEPS),
                 "--inject", "pause:worker2@step=10,for=60s", "--dead-after-s", "1.5",
                 env={"TINY_MLP_DELAY_S": "0.02"}, timeout_s=90)
    took = time.monotonic() - t0
    summary = check_tiny_mlp_run(run, oracle(JOB, STEPS), STEPS, deaths=1)
    assert summary["deaths"][0]["worker"] == 2
    assert summary["faults_injected"][0]["fired_at_s"] is not None
    assert ("worker2 was declared dead during the run and is still running; stopping it"
            in run.stderr)
    assert "did not exit" not in run.stderr
    assert took < 45, f"{took:.1f} s: the launcher waited for the paused worker"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_whose_scheduler_is_killed_stops_by_itself(tmp_path):
    dead_after_s = 1.0
    with BareScheduler(tmp_path, workers=1, steps=100000, dead_after_s=dead_after_s) as cluster:
        sched, endpoint = cluster.proc, cluster.endpoint
        worker = subprocess.Popen([sys.executable, "-m", "worker", "--scheduler", endpoint,
                                   "--job", JOB, "--id", "0", "--timeout-s", "60"], cwd=ROOT,
                                  env={**os.environ, "TINY_MLP_DELAY_S": "0.02"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        cluster.procs.append(worker)                         # ended with the cluster
        observer = Peer(cluster.ctx, endpoint, "observer")
        deadline = time.monotonic() + 60
        while observer.request(Kind.STATUS, 5)[0].get("step", 0) < 3:    # training
            assert worker.poll() is None and time.monotonic() < deadline, "no training progress"
            time.sleep(0.05)
        sched.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = worker.communicate(timeout=60)
        took = time.monotonic() - killed
        lost_after_s = dead_after_s + RESTART_ALLOWANCE_S
        assert worker.returncode == 4, stderr[-3000:]
        assert "stopping: no heartbeat answered by the scheduler" in stderr
        assert f"for {lost_after_s:.1f} s: it is gone" in stderr
        # Not before a restarted scheduler could have been back, nor near the 60 s timeout.
        assert lost_after_s - 0.5 < took < lost_after_s + 5, took
