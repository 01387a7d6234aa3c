"""``python -m worker``: start one worker and train until the scheduler says done.

Exit status: 0 when the run is over for this worker (done, or told ``run_over``), 1 on
an error (a job error included: the traceback is printed here, see ``job_failed``), 3
when it was declared dead (fenced), 4 when its scheduler stopped answering (lost).
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys

import zmq

from ps.core import compress
from ps.faults import messages
from ps.security import curve
from ps.wire.client import Peer, RemoteError
from ps.wire.protocol import Error, Kind
from worker.config import WorkerConfig
from worker.heartbeat import Fenced, SchedulerLost
from worker.job import JobError
from worker.runner import Worker
from worker.straggler import parse_jitter

log = logging.getLogger("worker")

JOB_ERROR_WAIT_S = 5.0   # how long a worker whose job raised waits for the scheduler's answer


def parse_args(argv=None) -> WorkerConfig:
    p = argparse.ArgumentParser(prog="python -m worker",
                                description="Run one worker: lease tasks, pull, compute, push.")
    p.add_argument("--scheduler", required=True, help="scheduler endpoint, e.g. tcp://10.0.0.1:5555")
    p.add_argument("--job", required=True, help="job file (build_model, build_dataset, loss_fn, ...)")
    p.add_argument("--id", type=int, default=-1, dest="worker_id",
                   help="worker id in [0, M) (default: assigned by the scheduler)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA where present, else CPU")
    p.add_argument("--seed", type=int, default=0, help="run seed (must match the scheduler's)")
    p.add_argument("--out", default=None,
                   help="the finisher (lowest live worker) writes params.npz here")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--timeout-s", type=float, default=WorkerConfig.timeout_s,
                   help="deadline of every request to the scheduler or a server")
    p.add_argument("--slow", type=float, default=1.0,
                   help="straggler emulation: every task F times slower (sleeps (F-1) x compute)")
    p.add_argument("--jitter", default="0:1", help="P:F: any task F times slower with probability P")
    p.add_argument("--trace", action="store_true",
                   help="write trace/worker<id>-<incarnation>.json into --out")
    p.add_argument("--crash-at", default=None, metavar="POINT@STEP",
                   help="fault hook: SIGKILL this worker at before_push, mid_push, "
                        "after_sparse_push or after_push of STEP; stall@STEP stops its main thread for 4 s before that push instead")
    p.add_argument("--secure", default=None, metavar="KEYDIR",
                   help="CurveZMQ with the keys in KEYDIR (python -m ps.security.keys); needs --id")
    p.add_argument("--grad-dtype", choices=compress.WIRE_DTYPES, default="float32",
                   help="gradients on the wire (servers sum in float32) (default: %(default)s)")
    p.add_argument("--param-dtype", choices=compress.WIRE_DTYPES, default="float32",
                   help="parameters on the wire (servers keep float32) (default: %(default)s)")
    p.add_argument("--prefetch", choices=("push", "compute", "off"), default="push",
                   help="send the next pull right behind the push (push), as soon as this "
                        "step's parameters are in (compute: SSP/ASP only), or not ahead (off) "
                        "(default: %(default)s)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=False,
                   help="BSP on the CPU: push shard by shard from backward hooks "
                        "(worker/speedups/overlap.py) instead of after backward (default: off)")
    p.add_argument("--fuse", type=int, default=0, metavar="N",
                   help="BSP/SSP: compute at most N tasks of a lease together, in one forward and "
                        "backward pass (0: as many as the scheduler leases; 1: one task per pass) "
                        "(default: %(default)s)")
    p.add_argument("--staged-buffers", action="store_true",
                   help="keep separate host and device parameter buffers on the CPU too, as on "
                        "CUDA, so the copies between them run (and are tested) without a GPU")
    p.add_argument("--log-level", default="WARNING")
    a = p.parse_args(argv)
    if a.secure and a.worker_id < 0:
        p.error("--secure needs --id: a worker's key names its id")
    if not 0 <= a.fuse <= 1 << 16:
        p.error("--fuse must be in [0, 65536] (0: no limit)")
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s worker{'' if a.worker_id < 0 else a.worker_id} "
                               "%(levelname)s %(message)s")
    try:
        jitter = parse_jitter(a.jitter)
    except ValueError as exc:
        p.error(str(exc))
    return WorkerConfig(a.scheduler, a.job, a.worker_id, a.device, a.seed, a.out, a.threads,
                        a.timeout_s, a.slow, jitter, a.trace, a.crash_at, a.secure,
                        a.grad_dtype, a.param_dtype, a.prefetch, a.overlap, a.fuse,
                        a.staged_buffers)


def main(argv=None) -> int:
    config = parse_args(argv)
    messages.install_from_env(f"worker{config.worker_id}" if config.worker_id >= 0 else "worker")
    if config.secure:
        curve.use(curve.Keyring(config.secure, f"worker{config.worker_id}"))
    faulthandler.register(signal.SIGUSR1)   # `kill -USR1 PID` prints every thread's stack
    worker = None
    try:
        worker = Worker(config)
        worker.run()
        return 0
    except JobError as exc:
        return job_failed(config, worker, exc)
    except Fenced as exc:
        log.error("stopping: %s", exc)
        return 3
    except SchedulerLost as exc:
        log.error("stopping: %s", exc)
        return 4
    except RemoteError as exc:
        if exc.code == Error.FENCED:        # a server refused us: we were declared dead
            log.error("stopping: %s", exc)
            return 3
        if exc.code == Error.RUN_OVER:      # a replacement that came too late, or a failed run
            log.warning("stopping: %s", exc.reason)
            return 0
        log.error("%s", exc)
        return 1
    except (TimeoutError, ValueError, FileNotFoundError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if worker is not None:
            worker.close()


def job_failed(config: WorkerConfig, worker: Worker | None, exc: JobError) -> int:
    """The job's own code raised. Tell the scheduler, which ends the run at once, then show
    the traceback: once a run, by the worker whose report ended it (or that could not
    tell). Every worker runs the same code, so the others often fail alike: one line each."""
    first = tell_scheduler(config, worker, exc)
    if first is False:
        log.error("job error in %s (%s) here too; the run was already over", exc.function,
                  exc.location)
    else:
        log.error("%s\n%s", exc, exc.traceback.rstrip())
    return 1


def tell_scheduler(config: WorkerConfig, worker: Worker | None, exc: JobError) -> bool | None:
    """Send JOB_ERROR; return whether it was the first (None: no answer). A worker that
    failed before it registered (``build_model``, ``build_dataset``) sends incarnation 0."""
    ctx = zmq.Context() if worker is None or worker.heartbeat is None else None
    peer = Peer(ctx, config.scheduler, "scheduler") if ctx else worker.scheduler
    wid, inc = (config.worker_id, 0) if ctx else (worker.id, worker.inc)
    peer.check = None      # this report's own answer decides; the heartbeat's verdict must not
    try:
        reply, _ = peer.request(Kind.JOB_ERROR, min(config.timeout_s, JOB_ERROR_WAIT_S),
                                worker=wid, inc=inc, function=exc.function,
                                location=exc.location, error=exc.error)
        return bool(reply.get("first"))
    except RemoteError as why:          # run_over: another job error had already ended it
        return False if why.code == Error.RUN_OVER else None
    except (TimeoutError, RuntimeError) as why:   # fenced, or the scheduler is lost
        log.warning("could not tell the scheduler about the job error: %s", why)
        return None
    finally:
        if ctx:
            peer.close()
            ctx.term()


if __name__ == "__main__":
    sys.exit(main())
