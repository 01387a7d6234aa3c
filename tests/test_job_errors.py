"""Job errors: an exception in the job's own code stops the run at once, and says where.

A bug in ``build_model``, ``loss_fn`` or ``finish`` (tests/jobs/raises.py, the function
chosen by ``RAISES_IN``) is not a fault to survive: every worker runs the same code. The
run must end with exit status 1 long before any death verdict or deadline (both set far
out here), print the traceback exactly once, with the job file's line, name the function
in the launcher's last line, and say why in summary.json. The first test checks the
JobError itself (function, line, traceback from the job's code down); another plays the
workers against a live scheduler: malformed JOB_ERROR reports are refused and change
nothing; the first good one fails the run, later ones hear it was not the first, and
every other request is told the run is over. The last starts one worker by hand whose
build_model raises before it could register: the forming run still ends at once.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from cluster import JOBS, ROOT, kill_group, launch
from live import BareScheduler, start_role
from ps.wire.client import NoReply, Peer, RemoteError
from ps.wire.protocol import MAX_JOB_ERROR_CHARS, Error, Kind
from worker.heartbeat import Fenced
from worker.job import JobError, collate, load_job

JOB = os.path.join(JOBS, "raises.py")
FAR = ["--dead-after-s", "60", "--timeout-s", "60"]   # no death verdict, no deadline: only the
                                                      # error can end the run in time


def line_of(ends: str = "", starts: str = "") -> int:
    """The first line of tests/jobs/raises.py that starts and ends so."""
    with open(JOB) as f:
        return next(i for i, line in enumerate(f, 1)
                    if line.startswith(starts) and line.rstrip().endswith(ends))


def marked_line(function: str) -> int:
    """The line of tests/jobs/raises.py marked ``# raises: <function>``."""
    return line_of(ends=f"# raises: {function}")


def test_a_job_error_names_the_function_the_line_and_keeps_the_traceback(monkeypatch):
    monkeypatch.setenv("RAISES_IN", "build_dataset")
    with pytest.raises(JobError) as err:
        load_job(JOB).build(0)
    line = marked_line("build_dataset")
    assert err.value.function == "build_dataset" and err.value.location.endswith(f"raises.py:{line}")
    assert str(err.value).startswith(f"job error in build_dataset ({err.value.location}): ")
    assert err.value.traceback.startswith("Traceback (most recent call last):\n  File ")
    assert f'raises.py", line {line}, in build_dataset' in err.value.traceback
    assert "worker/job.py" not in err.value.traceback      # from the job's code down
    # An error inside torch's own dataset: no frame in the job file, so the location is
    # where the dataset was built.
    monkeypatch.setenv("RAISES_IN", "")
    job = load_job(JOB)
    _, dataset = job.build(0)
    with pytest.raises(JobError) as err, job.running("dataset"):
        collate(dataset, [0, 10 ** 6], "cpu")
    def_line = line_of(starts="def build_dataset")
    assert err.value.function == "dataset" and err.value.location.endswith(f"raises.py:{def_line}")
    assert err.value.error.startswith("IndexError")


@pytest.mark.parametrize("error", [RemoteError("server0", Error.GONE, "version 3 is gone"),
                                   NoReply("no reply from server1"), Fenced("worker 1 fenced")])
def test_the_clusters_own_errors_raised_through_the_jobs_code_are_not_job_errors(error):
    # A sparse table's rows are pulled inside the job's forward: a refusal, a silence or a
    # fencing there is the cluster's business (a task to drop, a worker to stop), not a
    # bug in the job that should end the run.
    job = load_job(JOB)
    with pytest.raises(type(error)) as raised, job.running("loss_fn"):
        raise error
    assert raised.value is error
    with pytest.raises(JobError), job.running("loss_fn"):
        raise TimeoutError("the job's own timeout")            # a plain one is the job's


@pytest.mark.parametrize("function", [pytest.param("build_model", marks=pytest.mark.slow), "loss_fn",
                                      pytest.param("finish", marks=pytest.mark.slow)])
def test_a_job_error_stops_the_run_at_once_and_says_where(tmp_path, function):
    t0 = time.monotonic()
    run = launch(tmp_path, "--job", JOB, "--workers", "2", "--servers", "1", "--steps", "4", *FAR,
                 env={"RAISES_IN": function}, timeout_s=60)
    took = time.monotonic() - t0
    where = f"tests/jobs/raises.py:{marked_line(function)}"
    assert run.rc == 1, run.stderr[-4000:]
    assert took < 30, f"{took:.1f} s: the run waited for something other than the error"
    # The traceback once, from the job's code down, and its line in the job file.
    assert run.stderr.count("Traceback (most recent call last)") == 1, run.stderr[-4000:]
    assert f'raises.py", line {marked_line(function)}, in {function}' in run.stderr
    # The launcher's last line names the function, the file's line and the worker.
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"run failed: job error in {function} ({where}) on worker "), last
    summary = run.summary
    assert not summary["ok"] and summary["failure"] == last.removeprefix("run failed: ")
    record = summary["job_error"]
    assert record["function"] == function and record["location"] == where
    assert record["worker"] in (0, 1) and record["error"].startswith(
        "TypeError" if function == "build_model" else "RuntimeError")
    if function == "finish":                    # after training: the parameters were written
        assert os.path.exists(os.path.join(run.out, "params.npz"))
        assert summary["steps"] == 4 and len(summary["losses"]) == 4


def job_error(peer: Peer, worker: int, inc: int, **fields) -> dict:
    """Send a JOB_ERROR (a good one, unless ``fields`` override some) and return the reply,
    or raise RemoteError for a refusal."""
    report = {"worker": worker, "inc": inc, "function": "loss_fn", "location": "job.py:3",
              "error": "RuntimeError: boom", **fields}
    return peer.request(Kind.JOB_ERROR, 5, **report)[0]


def refused(peer: Peer, code: str, **fields) -> None:
    with pytest.raises(RemoteError) as err:
        job_error(peer, **fields)
    assert err.value.code == code, err.value


@pytest.mark.timeout(90)
def test_the_scheduler_checks_job_error_reports_and_ends_the_run_on_the_first(tmp_path):
    with BareScheduler(tmp_path, workers=2, steps=4, tasks_per_step=2, dead_after_s=60,
                       out=True) as cluster:
        sched = cluster.proc
        observer = Peer(cluster.ctx, cluster.endpoint, "observer")
        phase = lambda: observer.request(Kind.STATUS, 5)[0]["phase"]     # noqa: E731
        stranger = Peer(cluster.ctx, cluster.endpoint, "worker0")

        # Malformed, or from nobody the run knows: refused, and the run goes on forming.
        refused(stranger, Error.BAD_FIELD, worker=0, inc=0, function="train_step")
        refused(stranger, Error.BAD_FIELD, worker=0, inc=0, error="x" * (MAX_JOB_ERROR_CHARS + 1))
        refused(stranger, Error.BAD_FIELD, worker=0, inc=-1)
        refused(stranger, Error.UNKNOWN_SENDER, worker=2, inc=0)
        assert phase() == "forming"

        peers, incs = zip(*cluster.register(samples=16))     # 16 samples, batches of 4
        refused(peers[1], Error.FENCED, worker=1, inc=incs[1] + 100)          # not its incarnation
        assert phase() == "training"

        # The first good report fails the run; the scheduler lingers to say so, then exits.
        assert job_error(peers[0], worker=0, inc=incs[0])["first"] is True
        assert phase() == "failed"
        assert job_error(peers[1], worker=1, inc=incs[1])["first"] is False
        with pytest.raises(RemoteError) as over:
            peers[1].request(Kind.LEASE, 5, worker=1, inc=incs[1], step=0)
        assert over.value.code == Error.RUN_OVER and "job error in loss_fn" in over.value.reason
        with pytest.raises(RemoteError) as over:
            peers[1].request(Kind.HEARTBEAT, 5, role="worker", index=1, inc=incs[1])
        assert over.value.code == Error.RUN_OVER
        assert sched.wait(10) == 1
        with open(tmp_path / "summary.json") as f:
            summary = json.load(f)
        assert summary["failure"] == ("job error in loss_fn (job.py:3) on worker 0: "
                                      "RuntimeError: boom")
        assert summary["job_error"] == {"worker": 0, "incarnation": incs[0], "function": "loss_fn",
                                        "location": "job.py:3", "error": "RuntimeError: boom"}
        assert not summary["ok"] and summary["samples"] == 0


@pytest.mark.timeout(90)
@pytest.mark.slow
def test_a_job_error_before_registering_ends_a_forming_run(tmp_path):
    # A worker started alone (no launcher) whose build_model raises: it tells the scheduler
    # with incarnation 0, and the scheduler, still forming, writes why and exits at once.
    flags = ["--servers", "1", "--workers", "2", "--steps", "4", "--out", str(tmp_path)]
    procs = []
    try:
        sched, endpoint = start_role(["ps.scheduler", *flags], str(tmp_path / "scheduler.ep"))
        procs.append(sched)
        worker = subprocess.Popen([sys.executable, "-m", "worker", "--scheduler", endpoint,
                                   "--job", JOB, "--id", "1", "--timeout-s", "30"], cwd=ROOT,
                                  env={**os.environ, "RAISES_IN": "build_model"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        procs.append(worker)
        _, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 1, stderr[-3000:]
        assert stderr.count("Traceback (most recent call last)") == 1, stderr[-3000:]
        assert sched.wait(10) == 1
        with open(tmp_path / "summary.json") as f:
            summary = json.load(f)
        assert not summary["ok"]
        where = f"tests/jobs/raises.py:{marked_line('build_model')}"
        assert summary["failure"].startswith(f"job error in build_model ({where}) on worker 1: ")
        assert summary["job_error"]["incarnation"] == 0
    finally:
        for proc in procs:
            kill_group(proc)
            proc.wait(10)
