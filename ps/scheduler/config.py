"""The scheduler's configuration: ``SchedulerConfig`` and the flags that build it.

``python -m ps.scheduler`` calls ``parse_args``, which checks the flags, sets up
logging and returns one ``SchedulerConfig``; the scheduler reads its settings from
that object only, never from the environment. The invariant: a config that leaves
here is consistent (at least one server and one worker, checkpoints only in BSP and
only with a directory to write them to).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass

from ps.wire.protocol import DEAD_AFTER_S

TASKS_PER_WORKER = 4       # the finest default cut: tasks per worker per step (the grain of stealing)
MIN_TASK_SAMPLES = 16      # default tasks are never smaller than this
DEFAULT_INNER_STEPS = 8    # diloco: local steps per round (DiLoCo's H)
TASKS_PER_STEP_HELP = ("cut every global batch into this many tasks (default: adaptive, one "
                       "per worker while their measured speeds agree, 4 per worker of >= 16 "
                       "samples once they differ by more than 25%%)")   # also the launcher's


@dataclass
class SchedulerConfig:
    servers: int = 2
    workers: int = 2
    mode: str = "bsp"                    # bsp, ssp, asp, or diloco (ps.core.dealer: rounds)
    staleness: int = 0
    inner_steps: int = DEFAULT_INNER_STEPS   # diloco: H, a worker's local steps per round
    diloco_async: bool = False           # diloco: pushes applied on arrival (worker/diloco.py)
    momentum_every: int | None = None    # async diloco: the outer momentum every N pushes (M)
    steps: int | None = None             # total global steps; default: epochs x steps per epoch
    epochs: int | None = None            # default: the job's EPOCHS, else 1
    seed: int = 0
    tasks_per_step: int | None = None    # fixed grain; None: adaptive, up to default_tasks_per_step
    steal: bool = True                   # work stealing and speed-proportional dealing
    trace: bool = False                  # write trace/scheduler.json into out
    bind: str = "tcp://127.0.0.1:*"
    endpoint_file: str | None = None     # where to write the bound endpoint (for launchers)
    out: str | None = None               # where summary.json goes
    timeout_s: float = 120.0             # per phase: forming, a step without progress, finishing
    dead_after_s: float = DEAD_AFTER_S   # silence after which a worker or server is declared dead
    checkpoint_every: int = 0            # BSP: a coordinated checkpoint every K steps (0: none)
    checkpoint_dir: str | None = None    # where shards write them and manifests commit them
    resume: bool = False                 # start from the newest intact checkpoint there
    journal: str | None = None           # append-only record of our decisions; replayed on restart
    crash_at: str | None = None          # fault hook: SIGKILL ourselves at this point (CRASH_POINTS)
    secure: str | None = None            # key directory: CurveZMQ, only allow-listed keys (ps.security.curve)


MODES = ("bsp", "ssp", "asp", "diloco")
CRASH_POINTS = ("register@K", "report@N", "norm@N", "finishing")   # --crash-at: the K-th
                                # REGISTER while forming; the first REPORT of step N, journaled,
                                # not yet answered; the first NORM of step N (clipping), not
                                # answered; once every worker is done, the phase journaled, DONE
                                # not answered


def crash_at(config: SchedulerConfig, point: str, n: int | None = None) -> None:
    """Fault hook: SIGKILL this process here if --crash-at names this point."""
    if config.crash_at is not None and config.crash_at == (point if n is None else f"{point}@{n}"):
        os.kill(os.getpid(), signal.SIGKILL)


def default_tasks_per_step(batch_size: int, workers: int) -> int:
    """The finest cut of a step when the grain adapts (``ps.core.dealer``): four tasks per
    worker, so stealing can move quarters of a worker's share, but none smaller than
    MIN_TASK_SAMPLES: a task's compute should dwarf the ~0.2 ms scheduler round trip of its
    lease (which the worker overlaps with compute anyway)."""
    return max(workers, min(TASKS_PER_WORKER * workers, batch_size // MIN_TASK_SAMPLES))


def add_mode_arguments(p) -> None:
    """--mode and DiLoCo's flags: the scheduler's and the launcher's alike."""
    p.add_argument("--mode", choices=MODES, default="bsp",
                   help="consistency model; diloco: H local steps a round, then one outer step")
    p.add_argument("--inner-steps", type=int, default=DEFAULT_INNER_STEPS, metavar="H",
                   help="diloco: local optimizer steps each worker takes per round (default %(default)s)")
    p.add_argument("--async", dest="diloco_async", action="store_true",
                   help="diloco: apply each worker's push on arrival (bounded by --staleness, "
                        "in rounds), a slow worker taking fewer local steps")
    p.add_argument("--momentum-every", type=int, default=None, metavar="N",
                   help="async diloco: apply the outer momentum once every N pushes "
                        "(Delayed Nesterov; default: the workers M)")


def parse_args(argv=None) -> SchedulerConfig:
    p = argparse.ArgumentParser(prog="python -m ps.scheduler",
                                description="Run the scheduler of a parameter-server cluster.")
    p.add_argument("--servers", type=int, default=2, help="number of servers (shards) S")
    p.add_argument("--workers", type=int, default=2, help="number of workers M")
    add_mode_arguments(p)
    p.add_argument("--staleness", type=int, default=0, help="SSP staleness bound s (clocks)")
    p.add_argument("--steps", type=int, default=None, help="global steps to train")
    p.add_argument("--epochs", type=int, default=None, help="epochs to train (default: the job's EPOCHS)")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument("--tasks-per-step", type=int, default=None,
                   help=TASKS_PER_STEP_HELP)
    p.add_argument("--no-steal", action="store_true",
                   help="deal tasks statically (equal round-robin shares, no stealing)")
    p.add_argument("--trace", action="store_true", help="write trace/scheduler.json into --out")
    p.add_argument("--bind", default=SchedulerConfig.bind, help="control endpoint (default: %(default)s)")
    p.add_argument("--endpoint-file", default=None, help="write the bound endpoint here")
    p.add_argument("--out", default=None, help="directory for summary.json")
    p.add_argument("--timeout-s", type=float, default=SchedulerConfig.timeout_s,
                   help="deadline of each phase without progress")
    p.add_argument("--dead-after-s", type=float, default=DEAD_AFTER_S,
                   help="declare a worker or server dead after this long without a heartbeat")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="BSP: a coordinated checkpoint every K steps (0: none)")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint directory (default: OUT/checkpoints)")
    p.add_argument("--resume", action="store_true",
                   help="start from the newest intact checkpoint in --checkpoint-dir")
    p.add_argument("--secure", default=None, metavar="KEYDIR",
                   help="CurveZMQ with the keys in KEYDIR (python -m ps.security.keys): only their holders get in")
    p.add_argument("--journal", default=None, metavar="PATH",
                   help="record the scheduler's state in PATH; started again with the same PATH (and "
                        "--bind of the endpoint it had), it replays it and the run goes on")
    p.add_argument("--crash-at", default=None, metavar="POINT",
                   help="fault hook: SIGKILL the scheduler at " + ", ".join(CRASH_POINTS))
    p.add_argument("--log-level", default="WARNING")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s scheduler %(levelname)s %(message)s")
    if a.servers < 1 or a.workers < 1 or a.staleness < 0 or a.inner_steps < 1:
        p.error("--servers, --workers and --inner-steps must be >= 1 and --staleness >= 0")
    if (a.diloco_async or a.momentum_every is not None) and a.mode != "diloco":
        p.error("--async and --momentum-every belong to --mode diloco")
    if a.momentum_every is not None and a.momentum_every < 1:
        p.error("--momentum-every must be >= 1")
    if (a.checkpoint_every or a.resume) and not (a.checkpoint_dir or a.out):
        p.error("checkpoints need --checkpoint-dir (or --out)")
    if (a.checkpoint_every or a.resume) and a.mode != "bsp":
        p.error("coordinated checkpoints need --mode bsp (SSP and ASP shards are never at one "
                "version; diloco's are not supported yet)")
    return SchedulerConfig(
        servers=a.servers, workers=a.workers, mode=a.mode, staleness=a.staleness,
        inner_steps=a.inner_steps, diloco_async=a.diloco_async,
        momentum_every=a.momentum_every, steps=a.steps,
        epochs=a.epochs, seed=a.seed, tasks_per_step=a.tasks_per_step, steal=not a.no_steal,
        trace=a.trace, bind=a.bind, endpoint_file=a.endpoint_file, out=a.out, timeout_s=a.timeout_s,
        dead_after_s=a.dead_after_s, checkpoint_every=a.checkpoint_every,
        checkpoint_dir=a.checkpoint_dir or (os.path.join(a.out, "checkpoints") if a.out else None),
        resume=a.resume, journal=a.journal, crash_at=a.crash_at, secure=a.secure)
