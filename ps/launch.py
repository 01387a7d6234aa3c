"""The launcher behind ``scripts/start_cluster.sh``: a whole cluster on this machine.

It starts one scheduler, S servers and M workers as separate processes (the same
``python -m ps.scheduler`` / ``ps.server`` / ``worker`` commands a multi-host
deployment runs by hand), writes ``cluster.json``, shows a live status line from
the scheduler's STATUS replies, and waits. It stops everything when the run ends,
when any role fails (naming it), or on Ctrl-C, and exits non-zero unless the run
succeeded. The run itself writes ``summary.json`` (scheduler) and ``params.npz``
(worker 0) into ``--out``.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import zmq

from .client import Peer, RemoteError
from .membership import DEAD_AFTER_S
from .protocol import Kind
from . import netfaults
from .checkpoint import latest_intact
from .faults import split as split_faults
from .trace import merge as merge_traces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JOB = os.path.join(ROOT, "examples", "mlp_classifier.py")
STATUS_INTERVAL_S = 0.5          # how often the status line refreshes
LOG_STATUS_INTERVAL_S = 5.0      # when stderr is not a terminal, one status line this often
INJECT_INTERVAL_S = 0.1          # with faults to inject, progress is polled this often
STOP_GRACE_S = 5.0               # SIGTERM, then this long, then SIGKILL
EXIT_GRACE_S = 30.0              # after the scheduler exits, how long the others may take
ENDPOINT_WAIT_S = 60.0           # how long a role may take to bind and publish its endpoint
MAX_RECOVERIES = 5               # --recover gives up after this many restarts


@dataclass
class Role:
    name: str                     # scheduler | server0 | worker1 ...
    proc: subprocess.Popen
    endpoint: str | None


def _die_with_parent() -> None:
    """Children get SIGKILL if the launcher dies, so no role outlives a killed run."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Cluster:
    def __init__(self, args, faults: list, net: dict):
        self.args = args
        self.roles: list[Role] = []
        self.retired: list[Role] = []            # roles that exited and were replaced
        self.env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.worker_argv: dict[str, list[str]] = {}
        self.faults = faults
        self.server_lost: str | None = None
        if net:                          # message faults: every role's transport reads this
            self.env[netfaults.ENV] = ",".join(f"{k}={v}" for k, v in net.items()) + f",seed={args.seed}"

    def spawn(self, name: str, module: str, argv: list[str], env: dict | None = None) -> None:
        cmd = [sys.executable, "-m", module, *argv, "--log-level", self.args.log_level]
        proc = subprocess.Popen(cmd, env=env or self.env, preexec_fn=_die_with_parent)
        self.roles.append(Role(name, proc, None))

    def server_hooks(self, k: int) -> list[str]:
        """Fault hooks for server k (first start only: a restarted cluster runs clean)."""
        hooks = []
        if k in self.args.server_crash_at and not self.args.resume:
            hooks += ["--crash-at", self.args.server_crash_at[k]]
        if self.args.fail_checkpoints:
            hooks += ["--fail-checkpoints"]
        return hooks

    def endpoint(self, role: Role, path: str) -> str:
        """Wait for a role to publish the endpoint it bound (port * = any free port)."""
        deadline = time.monotonic() + ENDPOINT_WAIT_S
        while not os.path.exists(path):
            if role.proc.poll() is not None:
                raise RuntimeError(f"{role.name} exited with status {role.proc.returncode} "
                                   "before binding its endpoint")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{role.name} published no endpoint in {ENDPOINT_WAIT_S:.0f} s")
            time.sleep(0.02)
        with open(path) as f:
            role.endpoint = f.read().strip()
        os.remove(path)
        return role.endpoint

    def start(self) -> str:
        a = self.args
        common = ["--timeout-s", str(a.timeout_s)]
        ep_file = lambda name: os.path.join(a.out, f".{name}.endpoint")   # noqa: E731
        sched_argv = ["--servers", str(a.servers), "--workers", str(a.workers), "--mode", a.mode,
                      "--staleness", str(a.staleness), "--seed", str(a.seed),
                      "--bind", "tcp://127.0.0.1:*", "--endpoint-file", ep_file("scheduler"),
                      "--out", a.out, *common]
        for flag, value in (("--steps", a.steps), ("--epochs", a.epochs),
                            ("--tasks-per-step", a.tasks_per_step)):
            if value is not None:
                sched_argv += [flag, str(value)]
        sched_argv += ["--no-steal"] * a.no_steal + ["--trace"] * a.trace
        sched_argv += ["--dead-after-s", str(a.dead_after_s)]
        sched_argv += ["--checkpoint-every", str(a.checkpoint_every), "--checkpoint-dir", a.checkpoint_dir]
        sched_argv += ["--resume"] * a.resume
        self.spawn("scheduler", "ps.scheduler", sched_argv)
        sched_ep = self.endpoint(self.roles[0], ep_file("scheduler"))
        for k in range(a.servers):
            self.spawn(f"server{k}", "ps.server", ["--scheduler", sched_ep, "--bind", "tcp://127.0.0.1:*",
                                                   "--endpoint-file", ep_file(f"server{k}"), "--shard", str(k),
                                                   *self.server_hooks(k), *common])
        threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers)
        self.worker_env = dict(self.env, OMP_NUM_THREADS=str(threads))
        for w in range(a.workers):
            self.worker_argv[f"worker{w}"] = [
                "--scheduler", sched_ep, "--job", a.job, "--id", str(w), "--device", a.device,
                "--seed", str(a.seed), "--out", a.out, "--threads", str(threads),
                "--slow", str(a.slow.get(w, 1.0)), "--jitter", a.jitter,
                *(["--trace"] * a.trace), *common]
            crash = ["--crash-at", a.crash_at[w]] if w in a.crash_at else []   # not for replacements
            self.spawn(f"worker{w}", "worker", self.worker_argv[f"worker{w}"] + crash, env=self.worker_env)
        for k in range(a.servers):
            self.endpoint(self.roles[1 + k], ep_file(f"server{k}"))
        self.write_cluster_json()
        return sched_ep

    def write_cluster_json(self) -> None:
        roles = {r.name: {"endpoint": r.endpoint, "pid": r.proc.pid} for r in self.roles}
        with open(os.path.join(self.args.out, "cluster.json"), "w") as f:
            json.dump({"job": self.args.job, "mode": self.args.mode, "roles": roles}, f, indent=2)

    def check_roles(self, line: "StatusLine", phase) -> bool:
        """Look at every role that exited. A server's failure is fatal, and so is any
        failure before the cluster has formed (it never could); a worker's failure in
        training is the scheduler's business (it deals the tasks again), and with
        --respawn a replacement is started. Returns True when the run must stop."""
        for i, r in enumerate(self.roles):
            code = r.proc.poll()
            if code in (None, 0) or r.name == "scheduler":
                continue
            if r.name.startswith("server") or phase() == "forming":
                line.end()
                if r.name.startswith("server"):
                    self.server_lost = r.name
                print(f"{r.name} exited with status {code}; stopping the cluster", file=sys.stderr)
                return True
            line.end()
            print(f"{r.name} exited with status {code}" +
                  ("; starting a replacement" if self.args.respawn else ""), file=sys.stderr)
            self.retired.append(r)
            self.roles.pop(i)
            if self.args.respawn:
                self.spawn(r.name, "worker", self.worker_argv[r.name], env=self.worker_env)
            return False
        return False

    def inject(self, step: int, elapsed_s: float) -> None:
        """Fire every fault whose trigger has come; resume pauses whose time is up."""
        for fault in self.faults:
            if fault.due(step, elapsed_s):
                role = self.find(fault.target)
                if role is None or role.proc.poll() is not None:
                    continue
                fault.fired_at_s = round(elapsed_s, 3)
                fault.pid = role.proc.pid
                os.kill(role.proc.pid, signal.SIGKILL if fault.action == "kill" else signal.SIGSTOP)
                print(f"injected {fault.spec} at {elapsed_s:.2f} s (step {step})", file=sys.stderr)
            elif (fault.action == "pause" and fault.fired_at_s is not None and not fault.resumed
                  and elapsed_s >= fault.fired_at_s + fault.duration_s):
                fault.resumed = True
                try:
                    os.kill(fault.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

    def find(self, name: str) -> Role | None:
        return next((r for r in self.roles if r.name == name), None)

    def wait_all(self, grace_s: float) -> bool:
        """After the scheduler exits, every other role must exit too, within grace_s."""
        for fault in self.faults:              # a role still paused could never exit
            if fault.action == "pause" and fault.fired_at_s is not None and not fault.resumed:
                fault.resumed = True
                try:
                    os.kill(fault.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for r in self.roles[1:]:
            try:
                r.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{r.name} did not exit after the run ended", file=sys.stderr)
                return False
            if r.proc.returncode != 0 and r.name.startswith("server"):
                print(f"{r.name} exited with status {r.proc.returncode}", file=sys.stderr)
                return False
        return True

    def stop(self) -> None:
        for r in self.retired:
            if r.proc.poll() is None:
                r.proc.kill()
            r.proc.wait()
        for r in self.roles:
            if r.proc.poll() is None:
                r.proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for r in self.roles:
            try:
                r.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()


def status_line(s: dict, mode: str) -> str:
    if s["phase"] == "forming":
        return f"[{mode}] forming the cluster: waiting for every server and worker to register"
    loss = f"{s['loss']:.4f}" if s.get("loss") is not None else "-"
    return (f"[{mode}] step {s.get('step', 0)}/{s.get('steps', '?')}  loss {loss}  "
            f"{s.get('samples_per_s', 0.0):,.0f} samples/s  max staleness {s.get('max_staleness', 0)}")


class StatusLine:
    """One line redrawn in place on a terminal; a line every few seconds into a log."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last, self.last_t, self.drawn = "", 0.0, False

    def show(self, text: str) -> None:
        if self.quiet or text == self.last:
            return
        if self.tty:
            print(f"\r{text:<90}", end="", file=sys.stderr, flush=True)
            self.drawn = True
        elif time.monotonic() - self.last_t >= LOG_STATUS_INTERVAL_S:
            print(text, file=sys.stderr, flush=True)
            self.last_t = time.monotonic()
        self.last = text

    def end(self) -> None:
        if self.drawn:
            print(file=sys.stderr)
            self.drawn = False


@dataclass
class Outcome:
    rc: int
    server_lost: str | None = None     # a server that died (the run can resume from a checkpoint)
    last_step: int = 0                 # the furthest step the run had reported


def run(args, faults, net: dict) -> Outcome:
    os.makedirs(args.out, exist_ok=True)
    for stale in ("summary.json", "params.npz"):
        if os.path.exists(os.path.join(args.out, stale)):
            os.remove(os.path.join(args.out, stale))
    cluster = Cluster(args, faults, net)
    outcome = Outcome(1)
    ctx = zmq.Context()
    try:
        sched_ep = cluster.start()
        observer = Peer(ctx, sched_ep, "scheduler")
        scheduler = cluster.roles[0].proc
        line = StatusLine(args.quiet)
        t_train = None
        while scheduler.poll() is None:
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
            time.sleep(INJECT_INTERVAL_S if cluster.faults else STATUS_INTERVAL_S)
        line.end()
        if not cluster.wait_all(EXIT_GRACE_S):
            return outcome
        if scheduler.returncode != 0:
            print(f"the scheduler exited with status {scheduler.returncode}", file=sys.stderr)
            outcome.server_lost = _lost_server(args.out)
        if args.trace:
            print(f"trace: {merge_traces(args.out)} (open in ui.perfetto.dev or chrome://tracing)",
                  file=sys.stderr)
        outcome.rc = 0 if scheduler.returncode == 0 else 1
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


def _lost_server(out: str) -> str | None:
    """Did the scheduler end the run because a server went silent? (summary.json says)"""
    try:
        with open(os.path.join(out, "summary.json")) as f:
            failure = json.load(f).get("failure") or ""
    except (OSError, ValueError):
        return None
    return failure.split(" silent")[0] if failure.startswith("server ") else None


def launch(args) -> int:
    """Run the job; with --recover, a lost server restarts the cluster from the newest
    checkpoint (BSP replays the same steps, so the result is the one a run without the
    fault would give). Each recovery is recorded in summary.json."""
    faults, net = split_faults(args.inject)
    recoveries = []
    while True:
        t0 = time.monotonic()
        outcome = run(args, faults, net)
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
    _record(args.out, faults, recoveries)
    if outcome.rc != 0:
        return outcome.rc
    return report(args.out)


def _latest_version(root: str) -> int:
    manifest, _ = latest_intact(root)
    return manifest["version"] if manifest else 0


def _record(out: str, faults, recoveries: list[dict]) -> None:
    """Add what was injected, and each recovery, to summary.json."""
    path = os.path.join(out, "summary.json")
    if not (faults or recoveries) or not os.path.exists(path):
        return
    with open(path) as f:
        summary = json.load(f)
    summary["faults_injected"] = [{"spec": f.spec, "fired_at_s": f.fired_at_s} for f in faults]
    summary["recoveries"] = recoveries
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)


def _phase(observer: Peer) -> str:
    """The run's phase now (asked when a role has exited: a stale answer would mislead)."""
    try:
        return observer.request(Kind.STATUS, 2.0)[0]["phase"]
    except (TimeoutError, RemoteError):
        return "unknown"


def report(out: str) -> int:
    path = os.path.join(out, "summary.json")
    if not os.path.exists(path):
        print(f"no summary was written to {path}", file=sys.stderr)
        return 1
    with open(path) as f:
        s = json.load(f)
    if not s.get("ok"):
        print(f"run failed: {s.get('failure')}", file=sys.stderr)
        return 1
    loss = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "-"
    print(f"{s['mode']}: {s['steps']} steps, {s['samples']} samples in {s['wall_s']:.1f} s "
          f"({s['samples_per_s']:,.0f} samples/s), final loss {loss}, max staleness "
          f"{s['max_staleness']}, duplicates rejected {s['duplicates_rejected']}; results in {out}",
          file=sys.stderr)
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="scripts/start_cluster.sh",
                                description="Start a local parameter-server cluster and train a job.")
    p.add_argument("--job", default=DEFAULT_JOB, help="job file (default: examples/mlp_classifier.py)")
    p.add_argument("--servers", type=int, default=2, help="servers (shards) S (default: 2)")
    p.add_argument("--workers", type=int, default=2, help="workers M (default: 2)")
    p.add_argument("--mode", choices=("bsp", "ssp", "asp"), default="bsp", help="consistency model")
    p.add_argument("--staleness", type=int, default=None,
                   help="SSP staleness bound s (default: 2 with --mode ssp, else 0)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=None, help="global steps to train")
    steps.add_argument("--epochs", type=int, default=None, help="epochs (default: the job's EPOCHS, else 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's initial values and data order")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="worker device: auto = CUDA where present")
    p.add_argument("--out", default=None, help="output directory (default: runs/<time>)")
    p.add_argument("--quiet", action="store_true", help="no live status line")
    p.add_argument("--tasks-per-step", type=int, default=None,
                   help="tasks a global batch is cut into (default: 4 per worker, >= 16 samples each)")
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
                        "(after shard 0 took its push, before the others) or after_push, at STEP")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="BSP: a coordinated checkpoint of every shard every K steps (0: none)")
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUT/checkpoints)")
    p.add_argument("--resume", action="store_true",
                   help="start from the newest intact checkpoint (also with another --servers)")
    p.add_argument("--recover", action="store_true",
                   help="when a server is lost, restart the cluster from the newest checkpoint")
    p.add_argument("--server-crash-at", action="append", default=[], metavar="S:checkpoint@V",
                   help="fault hook: server S dies while writing checkpoint V (before the rename)")
    p.add_argument("--fail-checkpoints", action="store_true",
                   help="fault hook: every checkpoint write fails with ENOSPC (a full disk)")
    p.add_argument("--dead-after-s", type=float, default=DEAD_AFTER_S,
                   help="declare a worker or server dead after this long without a heartbeat")
    p.add_argument("--log-level", default="WARNING", help="log level of every role")
    args = p.parse_args(argv)
    if args.servers < 1 or args.workers < 1:
        p.error("--servers and --workers must be at least 1")
    try:
        split_faults(args.inject)
    except ValueError as exc:
        p.error(str(exc))
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
        args.staleness = 2 if args.mode == "ssp" else 0
    if args.staleness < 0:
        p.error("--staleness must be >= 0")
    if not os.path.isfile(args.job):
        p.error(f"job file {args.job!r} does not exist")
    args.job = os.path.abspath(args.job)
    try:
        args.server_crash_at = {int(i.split(":", 1)[0]): i.split(":", 1)[1] for i in args.server_crash_at}
    except ValueError:
        p.error("--server-crash-at wants S:checkpoint@V")
    if (args.checkpoint_every or args.recover) and args.mode != "bsp":
        p.error("checkpoints and --recover need --mode bsp (SSP and ASP shards are never at one version)")
    args.out = os.path.abspath(args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    args.checkpoint_dir = os.path.abspath(args.checkpoint_dir or os.path.join(args.out, "checkpoints"))
    return args


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)     # `kill` stops the cluster like Ctrl-C does
    return launch(parse_args(argv))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
