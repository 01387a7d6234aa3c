"""The launcher behind ``scripts/start_cluster.sh``: a whole cluster on this machine.

It starts one scheduler, S servers and M workers as separate processes (the same
``python -m ps.scheduler`` / ``ps.server`` / ``worker`` commands a multi-host
deployment runs by hand), writes ``cluster.json``, shows a live status line from
the scheduler's STATUS replies, and waits. It stops everything when the run ends,
when any role fails (naming it), or on Ctrl-C, and exits non-zero unless the run
succeeded (a worker the run declared dead that outlives it is stopped, and does not
count against it: ``Cluster.wait_all``). The run itself writes ``summary.json``
(scheduler) and ``params.npz`` (the worker that finishes the run) into ``--out``.

This module holds one attempt at the run (``run``) and --recover's restarts
(``launch``); the flags are ``ps.launch.flags``'s, the processes are ``ps.launch.processes``'s, the status line is
``ps.launch.statusline``'s, and ``ps.scheduler.summary`` reads and amends summary.json. With --netns
the roles run in network namespaces (``ps.launch.netns``, which also injects the link
faults); with --hosts, on other machines over ssh (``ps.launch.hosts``); with --ray, on
the nodes of a Ray cluster (``ps.launch.ray_engine``).
"""
from __future__ import annotations

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

from ps import sparse
from ps.faults.inject import split as split_faults
from ps.faults.inject import split_links
from ps.launch import hosts, netns, ray_engine
from ps.launch.flags import parse_args, role_names
from ps.launch.processes import Cluster
from ps.launch.statusline import StatusLine, status_line
from ps.reliability.checkpoint import latest_intact
from ps.scheduler import summary
from ps.security import curve, keys
from ps.trace import merge as merge_traces
from ps.wire.client import Peer, RemoteError
from ps.wire.protocol import Kind

__all__ = ["launch", "main", "parse_args", "run"]
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
        observer.check = _unless_exited(cluster)
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
            if "ray" in sys.modules:
                sys.modules["ray"].shutdown()
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


def _unless_exited(cluster: Cluster):
    """A Peer check that ends a STATUS wait once the scheduler has exited: that request
    would never be answered, and the launcher would wait out its timeout."""
    def check() -> None:
        if cluster.roles[0].proc.poll() is not None:
            raise TimeoutError("the scheduler exited")
    return check


def _phase(observer: Peer) -> str:
    """The run's phase now (asked when a role has exited: a stale answer would mislead)."""
    try:
        return observer.request(Kind.STATUS, 2.0)[0]["phase"]
    except (TimeoutError, RemoteError):
        return "unknown"


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)     # `kill` stops the cluster like Ctrl-C does
    # and so does SIGINT, even when started from a script's background job, which gets
    # SIGINT ignored (POSIX, without job control) and Python keeps that
    signal.signal(signal.SIGINT, signal.default_int_handler)
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # `kill -USR1`: where it is
    return launch(parse_args(argv))


def _interrupt(signum, frame):
    raise KeyboardInterrupt
