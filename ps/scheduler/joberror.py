"""Job errors: a worker's report that the job's own code raised, which ends the run.

An exception in ``build_model``, ``build_dataset``, the dataset, ``loss_fn`` or
``finish`` is a bug in the job: every worker runs the same code and would meet it
again, and dealing the tasks to the others (what a crashed worker gets) would only
repeat it. So the worker sends JOB_ERROR, and the first one that counts fails the
run at once, naming the function, the job file's line and the worker; the
scheduler then lingers ``LINGER_S`` to tell the other workers that the run is over
(their own JOB_ERROR is answered ``first: false``, anything else ``run_over``) and
exits with the failure in summary.json. A worker whose *process* dies is not this:
that stays a fault the run survives.

``admit`` is the check, a function of the header and the scheduler state it names;
``Scheduler.on_job_error`` acts on it.
"""
from __future__ import annotations

import time

from ps.scheduler.membership import Membership
from ps.wire.protocol import JOB_FUNCTIONS, MAX_JOB_ERROR_CHARS, Error, ProtocolError

LINGER_S = 1.0      # after the first job error, how long the scheduler still answers: the other
                    # workers' reports of it, and their requests (run_over), before it exits

NEEDED = ("forming", "reforming", "training")   # phases in which a worker not yet registered
                                                # (incarnation 0) still counts: it is awaited


def admit(header: dict, workers: int, phase: str, failure: str | None,
          members: Membership) -> dict | None:
    """Check a JOB_ERROR; return the record it fails the run with, or None when it does not
    count (the run is over already: failed, or stopping; or its sender is no longer needed).
    Raises ProtocolError for a malformed one, or one from a fenced incarnation."""
    worker, inc = header["worker"], header["inc"]
    if not -1 <= worker < workers:
        raise ProtocolError(Error.UNKNOWN_SENDER, f"unknown worker {worker}")
    if header["function"] not in JOB_FUNCTIONS:
        raise ProtocolError(Error.BAD_FIELD, f"function must be one of {', '.join(JOB_FUNCTIONS)}")
    if max(len(header["location"]), len(header["error"])) > MAX_JOB_ERROR_CHARS:
        raise ProtocolError(Error.BAD_FIELD, f"location and error must be at most "
                                             f"{MAX_JOB_ERROR_CHARS} characters")
    if inc < 0:
        raise ProtocolError(Error.BAD_FIELD, "inc must be >= 0 (0: not registered yet)")
    if failure is not None or phase in ("stopping", "exit"):
        return None
    if inc > 0:                  # a registered worker: only its live incarnation speaks
        members.seen("worker", worker, inc, time.monotonic())
    elif phase not in NEEDED:  # a replacement that failed once training was over
        return None
    return {"worker": worker, "incarnation": inc, "function": header["function"],
            "location": header["location"], "error": header["error"]}


def describe(record: dict) -> str:
    """The run's failure, in one line: ``job error in loss_fn (x.py:12) on worker 0: ...``."""
    who = f"worker {record['worker']}" if record["worker"] >= 0 else "a worker"
    return (f"job error in {record['function']} ({record['location']}) on {who}: "
            f"{record['error']}")
