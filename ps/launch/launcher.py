"""The launcher behind ``scripts/start_cluster.sh``: a whole cluster on this machine.

It starts one scheduler, S servers and M workers as separate processes (the same
``python -m ps.scheduler`` / ``ps.server`` / ``worker`` commands a multi-host
deployment runs by hand), writes ``cluster.json``, shows a live status line from
the scheduler's STATUS replies, and waits. It stops everything when the run ends,
when any role fails (naming it), or on Ctrl-C, and exits non-zero unless the run
succeeded (a worker the run declared dead that outlives it is stopped, and does not
count against it: ``Cluster.wait_all``). The run itself writes ``summary.json``
(scheduler) and ``params.npz`` (the worker that finishes the run) into ``--out``.

This module holds the flags, one attempt at the run (``run``) and --recover's
restarts (``launch``); the processes are ``ps.launch.processes``'s, the status line is
``ps.launch.statusline``'s, and ``ps.scheduler.summary`` reads and amends summary.json. With --netns
the roles run in network namespaces (``ps.launch.netns``, which also injects the link
faults); with --hosts, on other machines over ssh (``ps.launch.hosts``); with --ray, on
the nodes of a Ray cluster (``ps.launch.ray_engine``).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import zmq

from ps.core.compress import WIRE_DTYPES
from ps.faults.inject import split as split_faults
from ps.faults.inject import split_links
from ps.launch import hosts, netns, ray_engine
from ps.launch.processes import ROOT, Cluster
from ps import sparse
from ps.launch.statusline import StatusLine, status_line
from ps.reliability.checkpoint import latest_intact
from ps.scheduler import summary
from ps.scheduler.config import CRASH_POINTS, TASKS_PER_STEP_HELP, add_mode_arguments
from ps.security import curve, keys
from ps.trace import merge as merge_traces
from ps.wire.client import Peer, RemoteError
from ps.wire.protocol import DEAD_AFTER_S, Kind

DEFAULT_JOB = os.path.join(ROOT, "examples", "mlp_classifier.py")
STATUS_INTERVAL_S = 0.5          # how often the status line refreshes
INJECT_INTERVAL_S = 0.1          # with faults to inject, progress is polled this often
EXIT_GRACE_S = 30.0              # after the scheduler exits, how long the others may take
MAX_RECOVERIES = 5               # --recover gives up after this many restarts


@dataclass
class Outcome:
    rc: int
    server_lost: str | None = None     # a server that died (the run can resume from a checkpoint)
    last_step: int = 0                 # the furthest step the run had reported
    scheduler_started: float = 0.0     # monotonic time of the scheduler's start (deaths' clock)


def run(args, faults, net: dict, links: netns.LinkInjector | None = None, place=None) -> Outcome:
    os.makedirs(args.out, exist_ok=True)
    for stale in ("summary.json", "params.npz", "scheduler.journal"):
        if os.path.exists(os.path.join(args.out, stale)):
            os.remove(os.path.join(args.out, stale))
    shutil.rmtree(os.path.join(args.out, "sparse"), ignore_errors=True)   # tables' rows
    cluster = Cluster(args, faults, net, place)
    outcome = Outcome(1)
    ctx = zmq.Context()
    try:
        sched_ep = cluster.start()
        outcome.scheduler_started = cluster.scheduler_started
        observer = Peer(ctx, sched_ep, "scheduler")
        scheduler = cluster.roles[0].proc
        line = StatusLine(args.quiet)
        t_train = None
        while scheduler.poll() is None or cluster.restart_scheduler():
            scheduler = cluster.roles[0].proc
            if cluster.check_roles(line, lambda: _phase(observer)):
                outcome.server_lost = cluster.server_lost
                return outcome
            try:
                status, _ = observer.request(Kind.STATUS, 1.0)
                outcome.last_step = max(outcome.last_step, status.get("step", 0))
                line.show(status_line(status, args.mode))
                if t_train is None and status["phase"] == "training":
                    t_train = time.monotonic()
                if t_train is not None:
                    cluster.inject(status.get("step", 0), time.monotonic() - t_train)
            except (TimeoutError, RemoteError):   # best effort; the run decides success
                pass
            if links:                              # heals are due even outside training
                training = t_train is not None
                links.tick(outcome.last_step if training else None,
                           time.monotonic() - t_train if training else None)
            try:                                   # the interval, or less if the run ends
                scheduler.wait(INJECT_INTERVAL_S if cluster.faults or links else STATUS_INTERVAL_S)
            except subprocess.TimeoutExpired:
                pass
        line.end()
        if scheduler.returncode != 0:
            # The run failed (the summary says why): stop every role now rather than wait
            # for roles that may be hung (a paused server never exits by itself).
            print(f"the scheduler exited with status {scheduler.returncode}", file=sys.stderr)
            outcome.server_lost = summary.lost_server(args.out)
            return outcome
        if links:                  # a role still cut off could never hear that the run ended
            links.heal_all()
        if not cluster.wait_all(EXIT_GRACE_S, dead=summary.dead_workers(args.out)):
            return outcome
        cluster.collect()                  # Ray: the outputs roles wrote on other nodes
        if args.trace:
            print(f"trace: {merge_traces(args.out)} (open in ui.perfetto.dev or chrome://tracing)",
                  file=sys.stderr)
        outcome.rc = 0
        return outcome
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the cluster", file=sys.stderr)
        outcome.rc = 130
        return outcome
    except RuntimeError as exc:
        print(f"cluster failed to start: {exc}", file=sys.stderr)
        return outcome
    finally:
        cluster.stop()
        ctx.destroy(linger=0)


def launch(args) -> int:
    """Run the job; with --recover, a lost server restarts the cluster from the newest
    checkpoint (BSP replays the same steps, so the result is the one a run without the
    fault would give). Each recovery is recorded in summary.json."""
    faults, net = split_faults(args.inject)
    if args.secure:                 # the roles' key pairs, and the launcher's own (observer)
        keys.generate(args.secure, args.servers, args.workers)
        curve.use(curve.Keyring(args.secure, curve.OBSERVER))
    network = place = None
    if args.netns:
        try:
            network = netns.Network(role_names(args), args.link_mbps, args.link_delay_ms)
        except (netns.Unavailable, RuntimeError) as exc:
            print(exc, file=sys.stderr)
            return 2
        place = netns.Placement(network.plan)
    elif args.hosts:
        place = hosts.Placement(args.hosts)
    elif args.ray:
        try:
            place = _ray_placement(args)
        except RuntimeError as exc:
            print(f"--ray: {exc}", file=sys.stderr)
            return 1
    links = netns.LinkInjector(network, split_links(args.inject)) if network else None
    try:
        if network:
            network.up()
        return _attempts(args, faults, net, links, place)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping", file=sys.stderr)
        return 130
    except RuntimeError as exc:                    # the network could not be set up
        print(f"--netns: {exc}", file=sys.stderr)
        return 1
    finally:
        if network:
            network.down()
        if args.ray:
            ray_engine.import_ray().shutdown()     # a throwaway cluster (local) ends here


def _ray_placement(args):
    """Connect to Ray and size the servers (``ps.launch.ray_engine``)."""
    t0 = time.monotonic()
    parameters = ray_engine.describe(args.job)       # meanwhile, in a child process
    ray = ray_engine.connect(args.ray, args.servers + args.workers * args.threads)
    place = ray_engine.RayPlacement(ray, args, parameters())
    if not args.quiet:
        print(f"ray: connected to {ray.get_runtime_context().gcs_address} "
              f"({len(ray.nodes())} nodes) in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return place


def role_names(args) -> list[str]:
    return (["scheduler"] + [f"server{k}" for k in range(args.servers)]
            + [f"worker{w}" for w in range(args.workers)])


def _attempts(args, faults, net, links, place) -> int:
    recoveries = []
    lost_mono: dict[str, list[float]] = {}         # role -> when it was judged dead (monotonic)
    while True:
        t0 = time.monotonic()
        outcome = run(args, faults, net, links, place)
        if outcome.server_lost:
            lost_mono.setdefault(outcome.server_lost, []).append(time.monotonic())
        if not (outcome.server_lost and args.recover and len(recoveries) < MAX_RECOVERIES):
            break
        resumed = _latest_version(args.checkpoint_dir)
        recoveries.append({"lost": outcome.server_lost, "at_step": outcome.last_step,
                           "resumed_from_step": resumed,
                           "steps_redone": max(0, outcome.last_step - resumed),
                           "run_s_before": round(time.monotonic() - t0, 3)})
        print(f"{outcome.server_lost} lost at step {outcome.last_step}: restarting the cluster "
              f"from the checkpoint of step {resumed}", file=sys.stderr)
        args.resume = True
    sparse.merge_parts(args.out)             # the servers' parts of each sparse table
    summary.amend(args.out, faults + (links.faults if links else []), recoveries)
    if links and links.faults:
        _record_links(args.out, links, outcome.scheduler_started, lost_mono)
    if outcome.rc != 0:
        failure = summary.read(args.out).get("failure")
        if failure:                          # the scheduler's verdict (a job error, say), last
            print(f"run failed: {failure}", file=sys.stderr)
        return outcome.rc
    return summary.report(args.out)


def _record_links(out: str, links: netns.LinkInjector, scheduler_started: float,
                  lost_mono: dict[str, list[float]]) -> None:
    """Replace the link faults' entries in summary.json with their full records: the
    death verdicts of the last attempt's scheduler (``detected_at_s`` is on its clock),
    and the servers the launcher saw lost, tell when each fault was detected."""
    path = os.path.join(out, summary.FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        s = json.load(f)
    for death in s.get("deaths", []):
        lost_mono.setdefault(f"worker{death['worker']}", []).append(
            scheduler_started + death["detected_at_s"])
    firsts = {}
    for fault in links.faults:     # the first verdict on its target at or after its firing
        later = [t for t in lost_mono.get(fault.target, []) if t >= fault.fired_mono]
        if fault.fired_at_s is not None and later:
            firsts[fault.target] = min(later)
    records = {r["spec"]: r for r in links.records(firsts)}
    s["faults_injected"] = [records.get(r["spec"], r) for r in s.get("faults_injected", [])]
    summary.write(out, s)


def _latest_version(root: str) -> int:
    manifest, _ = latest_intact(root)
    return manifest["version"] if manifest else 0


def _phase(observer: Peer) -> str:
    """The run's phase now (asked when a role has exited: a stale answer would mislead)."""
    try:
        return observer.request(Kind.STATUS, 2.0)[0]["phase"]
    except (TimeoutError, RemoteError):
        return "unknown"


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
                        "(after shard 0 took its push, before the others) or after_push, at STEP; "
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


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)     # `kill` stops the cluster like Ctrl-C does
    # and so does SIGINT, even when started from a script's background job, which gets
    # SIGINT ignored (POSIX, without job control) and Python keeps that
    signal.signal(signal.SIGINT, signal.default_int_handler)
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # `kill -USR1`: where it is
    return launch(parse_args(argv))


def _interrupt(signum, frame):
    raise KeyboardInterrupt
