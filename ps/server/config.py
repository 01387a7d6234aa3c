"""A server's configuration: ``ServerConfig`` and the flags that build it.

``python -m ps.server`` calls ``parse_args``, which checks the flags, sets up logging
and returns one ``ServerConfig``; the server reads its settings from that object only
(tests build one directly). Everything else a server needs (its shard's range, the
optimizer, the mode) comes from the scheduler when the cluster forms.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from ps.wire import validation
from ps.wire.protocol import HEARTBEAT_INTERVAL_S


@dataclass
class ServerConfig:
    scheduler: str                       # the scheduler's endpoint
    bind: str = "tcp://127.0.0.1:*"      # where workers reach this shard (* = any free port)
    advertise: str | None = None         # endpoint to give workers, if not the bound one
    endpoint_file: str | None = None     # where to publish the endpoint (for launchers)
    shard: int = -1                      # which shard to serve (-1: the scheduler picks)
    crash_at: str | None = None          # fault hook "checkpoint@V": die while writing version V
    fail_checkpoints: bool = False       # fault hook: every checkpoint write fails (disk full)
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S   # how often the scheduler hears from us
    timeout_s: float = 120.0             # register wait, scheduler silence, parked-pull deadline
    secure: str | None = None            # key directory: CurveZMQ, only allow-listed keys (ps.security.curve)
    nonfinite: str = "reject"            # NaN/Inf gradients: reject | skip (ps.wire.validation)
    out: str | None = None               # where this server writes its sparse tables' rows
                                         # (default: the run's folder, as the scheduler says)


def parse_args(argv=None) -> ServerConfig:
    p = argparse.ArgumentParser(prog="python -m ps.server",
                                description="Serve one shard of the parameters (numpy only).")
    p.add_argument("--scheduler", required=True, help="scheduler endpoint, e.g. tcp://10.0.0.1:5555")
    p.add_argument("--bind", default=ServerConfig.bind,
                   help="data endpoint to bind (default: %(default)s, * = any free port)")
    p.add_argument("--advertise", default=None,
                   help="endpoint workers should connect to, when it differs from --bind")
    p.add_argument("--endpoint-file", default=None, help="write the bound endpoint here")
    p.add_argument("--shard", type=int, default=-1,
                   help="shard index in [0, S) (default: assigned by the scheduler)")
    p.add_argument("--heartbeat-interval-s", type=float, default=ServerConfig.heartbeat_interval_s)
    p.add_argument("--timeout-s", type=float, default=ServerConfig.timeout_s,
                   help="give up on a silent scheduler or an unanswerable pull after this long")
    p.add_argument("--crash-at", default=None, metavar="checkpoint@V",
                   help="fault hook: SIGKILL this server after writing checkpoint V, before its rename")
    p.add_argument("--fail-checkpoints", action="store_true",
                   help="fault hook: every checkpoint write fails with ENOSPC (a full disk)")
    p.add_argument("--secure", default=None, metavar="KEYDIR",
                   help="CurveZMQ with the keys in KEYDIR (python -m ps.security.keys); needs --shard")
    p.add_argument("--nonfinite", choices=validation.NONFINITE_POLICIES, default="reject",
                   help="a gradient with NaN or Inf: reject it (error reply) or skip it "
                        "(its tasks count, its values do not) (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="write this shard's sparse-table rows under OUT/sparse (default: the "
                        "run's folder, which the scheduler names)")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    if args.secure and args.shard < 0:
        p.error("--secure needs --shard: a server's key names its shard")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s server %(levelname)s %(message)s")
    return ServerConfig(args.scheduler, args.bind, args.advertise, args.endpoint_file, args.shard,
                        args.crash_at, args.fail_checkpoints, args.heartbeat_interval_s,
                        args.timeout_s, args.secure, args.nonfinite, args.out)
