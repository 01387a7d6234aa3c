"""The flags of ``scripts/start_cluster.sh`` (``python -m ps.launch``): ``parse_args``
reads and checks them, so that a run starts only with settings that fit together (every
refusal is an argparse error, exit status 2, naming the flag). ``ps.launch.launcher``
runs what they describe.
"""
from __future__ import annotations

import argparse
import os
import time

from ps.core.compress import WIRE_DTYPES
from ps.faults.inject import split as split_faults
from ps.faults.inject import split_links
from ps.launch import hosts
from ps.launch.processes import ROOT
from ps.scheduler.config import CRASH_POINTS, TASKS_PER_STEP_HELP, add_mode_arguments
from ps.wire.protocol import DEAD_AFTER_S

DEFAULT_JOB = os.path.join(ROOT, "examples", "mlp_classifier.py")


def role_names(args) -> list[str]:
    return (["scheduler"] + [f"server{k}" for k in range(args.servers)]
            + [f"worker{w}" for w in range(args.workers)])


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="scripts/start_cluster.sh",
                                description="Start a local parameter-server cluster and train a job.")
    p.add_argument("--job", default=DEFAULT_JOB, help="job file (default: examples/mlp_classifier.py)")
    p.add_argument("--servers", type=int, default=2, help="servers (shards) S (default: 2)")
    p.add_argument("--workers", type=int, default=2, help="workers M (default: 2)")
    add_mode_arguments(p)
    p.add_argument("--staleness", type=int, default=None,
                   help="SSP staleness bound s (default: 2 with --mode ssp or async diloco, else 0)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=None, help="global steps to train")
    steps.add_argument("--epochs", type=int, default=None, help="epochs (default: the job's EPOCHS, else 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's initial values and data order")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="worker device: auto = CUDA where present")
    p.add_argument("--out", default=None, help="output directory (default: runs/<time>)")
    p.add_argument("--quiet", action="store_true", help="no live status line")
    p.add_argument("--tasks-per-step", type=int, default=None,
                   help=TASKS_PER_STEP_HELP)
    p.add_argument("--no-steal", action="store_true",
                   help="deal tasks statically (equal shares, no stealing), for comparison")
    p.add_argument("--slow", action="append", default=[], metavar="W=F",
                   help="straggler emulation: worker W takes F times as long per task (repeatable)")
    p.add_argument("--jitter", default="0:1", metavar="P:F",
                   help="straggler emulation: any task F times slower with probability P (seeded)")
    p.add_argument("--trace", action="store_true",
                   help="write a Chrome trace of every role to OUT/trace.json")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: cores / M)")
    p.add_argument("--timeout-s", type=float, default=120.0,
                   help="any wait longer than this fails the run with a diagnosis")
    p.add_argument("--inject", action="append", default=[], metavar="SPEC",
                   help="fault injection, repeatable: kill:worker1@step=20, kill:worker0@time=3s, "
                        "pause:worker1@step=10,for=5s; message faults drop:0.02, dup:0.02, delay:5ms")
    p.add_argument("--respawn", action="store_true",
                   help="start a replacement for every worker that dies; it joins mid-run")
    p.add_argument("--crash-at", action="append", default=[], metavar="W:POINT@STEP",
                   help="worker W kills itself at a precise point: before_push, mid_push "
                        "(after shard 0 took its push, before the others), after_sparse_push (its "
                        "sparse tables have the step, its dense shards not) or after_push, at STEP; "
                        "stall@STEP: its main thread stops for 4 s before that push instead")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="BSP: a coordinated checkpoint of every shard every K steps (0: none)")
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUT/checkpoints)")
    p.add_argument("--resume", action="store_true",
                   help="start from the newest intact checkpoint (also with another --servers)")
    p.add_argument("--recover", action="store_true",
                   help="when a server is lost, restart the cluster from the newest checkpoint")
    p.add_argument("--server-crash-at", action="append", default=[], metavar="S:checkpoint@V",
                   help="fault hook: server S dies while writing checkpoint V (before the rename)")
    p.add_argument("--scheduler-crash-at", default=None, metavar="POINT",
                   help="fault hook: the scheduler kills itself at " + ", ".join(CRASH_POINTS)
                        + " (and is started again from its journal)")
    p.add_argument("--fail-checkpoints", action="store_true",
                   help="fault hook: every checkpoint write fails with ENOSPC (a full disk)")
    p.add_argument("--dead-after-s", type=float, default=DEAD_AFTER_S,
                   help="declare a worker or server dead after this long without a heartbeat")
    p.add_argument("--secure", nargs="?", const="", default=None, metavar="KEYDIR",
                   help="CurveZMQ between all roles, each with its own key from KEYDIR (default: "
                        "OUT/keys, made if missing; see SECURITY.md)")
    p.add_argument("--netns", action="store_true",
                   help="run every role in its own network namespace with its own address on a "
                        "virtual bridge (root only); link faults (partition, cut, flap) need it")
    p.add_argument("--link-mbps", type=float, default=None, metavar="N",
                   help="with --netns: shape every role's link to N Mbit/s each way (tc tbf)")
    p.add_argument("--link-delay-ms", type=float, default=0.0, metavar="D",
                   help="with --link-mbps: add D ms of delay to every link, each way (tc netem)")
    p.add_argument("--hosts", default=None, metavar="FILE",
                   help="start the roles on the hosts of FILE over ssh (docs/multihost.md)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run every role on a Ray cluster: ADDRESS as ray.init takes it (auto, "
                        "HOST:PORT), or local for a throwaway one here (docs/multihost.md)")
    p.add_argument("--ray-resources", action="append", default=[], metavar="ROLE:NAME=AMOUNT",
                   help="with --ray: every server (ROLE server) or worker (ROLE worker) also asks "
                        "for this custom Ray resource, e.g. worker:gpu_pool=1 (repeatable)")
    p.add_argument("--grad-dtype", choices=WIRE_DTYPES, default="float32",
                   help="gradients on the wire: float16/bfloat16 halve the bytes; servers sum "
                        "in float32 (default: %(default)s)")
    p.add_argument("--param-dtype", choices=WIRE_DTYPES, default="float32",
                   help="parameters on the wire (pulls); servers keep float32 master copies "
                        "and optimizer state (default: %(default)s)")
    p.add_argument("--prefetch", choices=("push", "compute", "off"), default="push",
                   help="send each worker's next pull right behind its push (push: it reads "
                        "its own writes; in BSP the server answers it when the step completes), "
                        "as soon as a step's parameters are in, to hide behind compute "
                        "(compute: SSP/ASP only), or not ahead (off) (default: %(default)s)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=False,
                   help="BSP on the CPU: push each shard's gradient from backward hooks as soon "
                        "as backward completes it (worker/speedups/overlap.py); off by default: "
                        "it measured no gain on a 2-core CPU machine (default: off)")
    p.add_argument("--staged-buffers", action="store_true",
                   help="workers keep separate host and device buffers on the CPU too, as on "
                        "CUDA (tests the GPU path's copies without a GPU)")
    p.add_argument("--fuse", type=int, default=0, metavar="N",
                   help="BSP/SSP: each worker computes at most N of the tasks it leases together, "
                        "in one forward and backward pass (0: all a lease carries, up to its "
                        "whole share of a step; 1: one task per pass, for A/B runs) "
                        "(default: %(default)s)")
    p.add_argument("--log-level", default="WARNING", help="log level of every role")
    args = p.parse_args(argv)
    if args.servers < 1 or args.workers < 1:
        p.error("--servers and --workers must be at least 1")
    if not 0 <= args.fuse <= 1 << 16:
        p.error("--fuse must be in [0, 65536] (0: no limit)")
    try:
        process_faults, _ = split_faults(args.inject)
        links = split_links(args.inject)
    except ValueError as exc:
        p.error(str(exc))
    if links and not args.netns:
        p.error("--inject partition/cut/flap need --netns (every role in its own network namespace)")
    if (args.link_mbps or args.link_delay_ms) and not args.netns:
        p.error("--link-mbps and --link-delay-ms shape the namespaces' links: they need --netns")
    if (args.link_mbps is not None and args.link_mbps <= 0) or args.link_delay_ms < 0:
        p.error("--link-mbps must be > 0 and --link-delay-ms >= 0")
    if args.link_delay_ms and not args.link_mbps:
        p.error("--link-delay-ms comes with --link-mbps")
    roles = role_names(args)
    for fault in links:
        if fault.target not in roles or (fault.dst and fault.dst not in roles):
            p.error(f"--inject {fault.spec!r}: no such role (this cluster has {', '.join(roles)})")
    if sum(map(bool, (args.hosts, args.netns, args.ray))) > 1:
        p.error("--hosts, --netns and --ray exclude each other")
    if args.ray_resources and not args.ray:
        p.error("--ray-resources needs --ray")
    try:
        args.ray_resources = _ray_resources(args.ray_resources)
    except ValueError as exc:
        p.error(str(exc))
    if args.ray and not args.threads:
        args.threads = 1              # a worker asks Ray for as many CPUs as it has threads
    if args.hosts:
        if process_faults:
            p.error("--inject kill/pause signal local processes: not with --hosts")
        try:
            args.hosts = hosts.assign(hosts.parse(open(args.hosts).read()), roles)
        except (OSError, ValueError) as exc:
            p.error(f"--hosts {args.hosts}: {exc}")
    try:
        args.crash_at = {int(item.split(":", 1)[0]): item.split(":", 1)[1] for item in args.crash_at}
    except ValueError:
        p.error("--crash-at wants W:POINT@STEP, e.g. 1:mid_push@20")
    try:
        args.slow = {int(w): float(f) for w, f in (item.split("=") for item in args.slow)}
    except ValueError:
        p.error("--slow wants W=F, e.g. --slow 1=3")
    if any(not 0 <= w < args.workers or f < 1 for w, f in args.slow.items()):
        p.error("--slow W=F needs 0 <= W < workers and F >= 1")
    if args.staleness is None:
        args.staleness = 2 if args.mode == "ssp" or args.diloco_async else 0
    if (args.diloco_async or args.momentum_every is not None) and args.mode != "diloco":
        p.error("--async and --momentum-every belong to --mode diloco")
    if args.momentum_every is not None and args.momentum_every < 1:
        p.error("--momentum-every must be >= 1")
    if args.staleness < 0 or args.inner_steps < 1:
        p.error("--staleness must be >= 0 and --inner-steps >= 1")
    if not os.path.isfile(args.job):
        p.error(f"job file {args.job!r} does not exist")
    args.job = os.path.abspath(args.job)
    try:
        args.server_crash_at = {int(i.split(":", 1)[0]): i.split(":", 1)[1] for i in args.server_crash_at}
    except ValueError:
        p.error("--server-crash-at wants S:checkpoint@V")
    if (args.checkpoint_every or args.recover or args.resume) and args.mode != "bsp":
        p.error("checkpoints, --resume and --recover need --mode bsp "
                "(SSP and ASP shards are never at one version)")
    args.out = os.path.abspath(args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    args.checkpoint_dir = os.path.abspath(args.checkpoint_dir or os.path.join(args.out, "checkpoints"))
    if args.secure is not None:
        args.secure = os.path.abspath(args.secure or os.path.join(args.out, "keys"))
    return args


def _ray_resources(items: list[str]) -> dict[str, dict[str, float]]:
    """``server:ssd=1`` -> {"server": {"ssd": 1.0}}."""
    asks: dict[str, dict[str, float]] = {}
    for item in items:
        role, _, ask = item.partition(":")
        name, _, amount = ask.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if role not in ("server", "worker") or not name or value <= 0:
            raise ValueError(f"--ray-resources {item!r}: want ROLE:NAME=AMOUNT, ROLE server or "
                             "worker, AMOUNT > 0 (e.g. worker:gpu_pool=1)")
        asks.setdefault(role, {})[name] = value
    return asks
