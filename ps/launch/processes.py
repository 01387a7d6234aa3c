"""The processes of a local cluster: one scheduler, S servers and M workers.

``Cluster`` starts each role as ``python -m ps.scheduler`` / ``ps.server`` / ``worker``
(the commands a multi-host deployment runs by hand), waits for the endpoint each
one binds and publishes, writes ``cluster.json``, watches for roles that exit
(starting a replacement worker with --respawn), sends the signals of ``--inject``
faults, and stops everything. The launcher (``ps.launch.launcher.run``) makes one per
attempt. Where each role runs is its *placement*: this machine on loopback (``Local``),
a network namespace of its own (``ps.launch.netns.Placement``, --netns), another host over
ssh (``ps.launch.hosts.Placement``, --hosts), or a node of a Ray cluster
(``ps.launch.ray_engine.RayPlacement``, --ray); a placement wraps the command and names the
address to bind, and may start the process itself (``popen``: Ray's runs on another node). The invariant: no role outlives the launcher (each child gets SIGKILL
when the launcher dies, and ``stop`` ends and reaps every process it started).
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from ps.faults import messages
from ps.launch.statusline import StatusLine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
TERM_GRACE_S = 5.0               # SIGTERM, then this long, then SIGKILL
ENDPOINT_WAIT_S = 60.0           # how long a role may take to bind and publish its endpoint
MAX_SCHEDULER_RESTARTS = 5       # a scheduler killed by a signal is started again this many times


@dataclass
class Role:
    name: str                     # scheduler | server0 | worker1 ...
    proc: subprocess.Popen
    endpoint: str | None
    replacement: bool = False     # started by --respawn for a worker that died


def die_with_parent() -> None:
    """Children get SIGKILL if the launcher dies, so no role outlives a killed run."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Local:
    """Every role on this machine, bound to loopback (the default placement)."""

    def command(self, name: str, cmd: list[str], env: dict) -> list[str]:
        return cmd

    def bind(self, name: str) -> str:
        return "tcp://127.0.0.1:*"

    def advertise(self, name: str) -> str | None:
        return None              # not known before it binds: the role publishes it


class Cluster:
    def __init__(self, args, faults: list, net: dict, place=None):
        self.args = args
        self.place = place or Local()
        self.roles: list[Role] = []
        self.retired: list[Role] = []            # roles that exited and were replaced
        self.scheduler_restarts = 0
        self.env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.worker_argv: dict[str, list[str]] = {}
        self.faults = faults
        self.server_lost: str | None = None
        self.collected = False                   # the roles' outputs on other nodes (Ray)
        if net:                          # message faults: every role's transport reads this
            self.env[messages.ENV] = ",".join(f"{k}={v}" for k, v in net.items()) + f",seed={args.seed}"

    def spawn(self, name: str, module: str, argv: list[str], env: dict | None = None) -> None:
        cmd = [sys.executable, "-m", module, *argv, "--log-level", self.args.log_level]
        if getattr(self.args, "secure", None):       # every role: CurveZMQ, its own key
            cmd += ["--secure", self.args.secure]
        cmd = self.place.command(name, cmd, env or self.env)
        if hasattr(self.place, "popen"):
            proc = self.place.popen(name, cmd, env or self.env)
        else:
            proc = subprocess.Popen(cmd, env=env or self.env, preexec_fn=die_with_parent)
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
        read = getattr(self.place, "read", None)      # a file on the role's node
        deadline = time.monotonic() + ENDPOINT_WAIT_S
        while (text := read(role.proc, path) if read else _read(path)) is None:
            if role.proc.poll() is not None:
                raise RuntimeError(f"{role.name} exited with status {role.proc.returncode} "
                                   "before binding its endpoint")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{role.name} published no endpoint in {ENDPOINT_WAIT_S:.0f} s")
            time.sleep(0.02)
        if not read:
            os.remove(path)
        role.endpoint = text.strip()
        return role.endpoint

    def start(self) -> str:
        a = self.args
        if hasattr(self.place, "prepare"):         # Ray: place every role at once
            self.place.prepare(["scheduler", *(f"server{k}" for k in range(a.servers)),
                                *(f"worker{w}" for w in range(a.workers))])
        common = ["--timeout-s", str(a.timeout_s)]
        ep_file = lambda name: os.path.join(a.out, f".{name}.endpoint")   # noqa: E731

        def where(name: str) -> list[str]:      # bind here; publish the endpoint unless known
            known = self.place.advertise(name)
            return ["--bind", self.place.bind(name)] + (
                ["--endpoint-file", ep_file(name)] if known is None else
                ["--advertise", known] * name.startswith("server"))
        sched_argv = ["--servers", str(a.servers), "--workers", str(a.workers), "--mode", a.mode,
                      "--inner-steps", str(a.inner_steps),
                      "--staleness", str(a.staleness), "--seed", str(a.seed),
                      *where("scheduler"), "--out", a.out, *common]
        for flag, value in (("--steps", a.steps), ("--epochs", a.epochs),
                            ("--tasks-per-step", a.tasks_per_step)):
            if value is not None:
                sched_argv += [flag, str(value)]
        sched_argv += ["--no-steal"] * a.no_steal + ["--trace"] * a.trace
        sched_argv += ["--async"] * a.diloco_async
        if a.momentum_every is not None:
            sched_argv += ["--momentum-every", str(a.momentum_every)]
        sched_argv += ["--dead-after-s", str(a.dead_after_s)]
        sched_argv += ["--checkpoint-every", str(a.checkpoint_every), "--checkpoint-dir", a.checkpoint_dir]
        sched_argv += ["--resume"] * a.resume
        sched_argv += ["--journal", os.path.join(a.out, "scheduler.journal")]   # for a restart
        crash = ["--crash-at", a.scheduler_crash_at] if a.scheduler_crash_at else []   # first start only
        self.spawn("scheduler", "ps.scheduler", sched_argv + crash)
        sched_ep = self.place.advertise("scheduler") or self.endpoint(self.roles[0], ep_file("scheduler"))
        self.sched_argv, self.sched_ep = sched_argv, sched_ep
        self.roles[0].endpoint = sched_ep
        self.scheduler_started = time.monotonic()   # ~ the scheduler's clock zero (deaths' times)
        if a.checkpoint_every or a.resume:
            if hasattr(self.place, "check_shared"):     # every server's node must see it
                self.place.check_shared(a.checkpoint_dir)
        for k in range(a.servers):
            self.spawn(f"server{k}", "ps.server", ["--scheduler", sched_ep, *where(f"server{k}"),
                                                   "--shard", str(k), "--out", a.out,
                                                   *self.server_hooks(k), *common])
        threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers)
        self.worker_env = dict(self.env, OMP_NUM_THREADS=str(threads))
        for w in range(a.workers):
            self.worker_argv[f"worker{w}"] = [
                "--scheduler", sched_ep, "--job", a.job, "--id", str(w), "--device", a.device,
                "--seed", str(a.seed), "--out", a.out, "--threads", str(threads),
                "--slow", str(a.slow.get(w, 1.0)), "--jitter", a.jitter,
                *(["--trace"] * a.trace), "--grad-dtype", a.grad_dtype,
                "--param-dtype", a.param_dtype, "--prefetch", a.prefetch,
                *(["--overlap"] * a.overlap), *(["--staged-buffers"] * a.staged_buffers),
                "--fuse", str(a.fuse), *common]
            crash = ["--crash-at", a.crash_at[w]] if w in a.crash_at else []   # not for replacements
            self.spawn(f"worker{w}", "worker", self.worker_argv[f"worker{w}"] + crash, env=self.worker_env)
        for k in range(a.servers):
            role = self.roles[1 + k]
            role.endpoint = self.place.advertise(role.name) or self.endpoint(role, ep_file(role.name))
        self.write_cluster_json()
        return sched_ep

    def write_cluster_json(self) -> None:
        """Publish where each role listens, atomically: tests and tools poll for this file
        and must never read it half written (it is rewritten when a role is replaced)."""
        location = getattr(self.place, "location", lambda proc: {})   # Ray: the node, its address
        roles = {r.name: {"endpoint": r.endpoint, "pid": r.proc.pid, **location(r.proc)}
                 for r in self.roles}
        path = os.path.join(self.args.out, "cluster.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"job": self.args.job, "mode": self.args.mode, "roles": roles}, f, indent=2)
        os.replace(path + ".tmp", path)

    def check_roles(self, line: StatusLine, phase) -> bool:
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
            # Not once training is over (a replacement would be told run_over anyway).
            respawn = self.args.respawn and phase() not in ("finishing", "stopping", "failed")
            print(f"{r.name} exited with status {code}" +
                  ("; starting a replacement" if respawn else ""), file=sys.stderr)
            self.retired.append(r)
            self.roles.pop(i)
            if respawn:
                self.spawn(r.name, "worker", self.worker_argv[r.name], env=self.worker_env)
                self.roles[-1].replacement = True
                self.write_cluster_json()
            return False
        return False

    def restart_scheduler(self) -> bool:
        """A scheduler killed by a signal (an injected kill, a crash) is started again, on the
        endpoint it had and with its journal, up to MAX_SCHEDULER_RESTARTS times; the roles
        register again with it (ps.reliability.scheduler_restart). One that exited with a
        status ended the run."""
        old = self.roles[0]
        if old.proc.returncode is None or old.proc.returncode >= 0 \
                or self.scheduler_restarts >= MAX_SCHEDULER_RESTARTS:
            return False
        self.scheduler_restarts += 1
        for fault in self.faults:                  # when the launcher saw the fault take effect
            if fault.target == "scheduler" and getattr(fault, "pid", None) == old.proc.pid:
                fault.detected_at_s = round(fault.fired_at_s + time.monotonic() - fault.fired_mono, 3)
                fault.detected_wall = time.time()
        argv = list(self.sched_argv)
        if argv[argv.index("--bind") + 1].endswith(":*"):   # it bound any port: the one it got
            argv[argv.index("--bind") + 1] = self.sched_ep
        print(f"the scheduler exited with status {old.proc.returncode}; starting it again "
              f"on {self.sched_ep} with its journal", file=sys.stderr)
        self.spawn("scheduler", "ps.scheduler", argv)
        self.retired.append(old)
        self.roles[0] = self.roles.pop()
        if "--endpoint-file" in argv:
            self.endpoint(self.roles[0], argv[argv.index("--endpoint-file") + 1])
        self.roles[0].endpoint = self.sched_ep
        self.write_cluster_json()
        return True

    def inject(self, step: int, elapsed_s: float) -> None:
        """Fire every fault whose trigger has come; resume pauses whose time is up."""
        for fault in self.faults:
            if fault.due(step, elapsed_s):
                role = self.find(fault.target)
                if role is None or role.proc.poll() is not None:
                    continue
                fault.fired_at_s = round(elapsed_s, 3)
                fault.fired_mono = time.monotonic()
                fault.pid, fault.proc = role.proc.pid, role.proc
                role.proc.send_signal(signal.SIGKILL if fault.action == "kill" else signal.SIGSTOP)
                print(f"injected {fault.spec} at {elapsed_s:.2f} s (step {step})", file=sys.stderr)
            elif self._paused(fault) and elapsed_s >= fault.fired_at_s + fault.duration_s:
                self._resume(fault)

    @staticmethod
    def _paused(fault) -> bool:
        return fault.action == "pause" and fault.fired_at_s is not None and not fault.resumed

    @staticmethod
    def _resume(fault) -> None:
        """SIGCONT a paused role (once; it may have been killed meanwhile)."""
        fault.resumed = True
        try:
            fault.proc.send_signal(signal.SIGCONT)
        except ProcessLookupError:
            pass

    def find(self, name: str) -> Role | None:
        return next((r for r in self.roles if r.name == name), None)

    def wait_all(self, grace_s: float, dead: set[str] = frozenset()) -> bool:
        """After the scheduler exits, every other role must exit too, within grace_s.

        A worker the run declared dead (``dead``, from summary.json) that is still running
        (paused, say, and woken after the end) had its work fenced and dealt again: it is
        stopped now, in one line, and the run's success stands. Any other role still
        running after grace_s fails the launch (False): the scheduler answered every live
        worker's DONE and heard every server's bye, so what is left is a hang to look at,
        though the run's results are complete; ``stop`` then ends it."""
        for fault in self.faults:              # a role still paused could never exit
            if self._paused(fault):
                self._resume(fault)
        deadline = time.monotonic() + grace_s
        for r in self.roles[1:]:
            if r.name in dead and r.proc.poll() is None and self._joined(r):
                print(f"{r.name} was declared dead during the run and is still running; "
                      "stopping it", file=sys.stderr)
                self.end(r)
                continue
            try:
                r.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if r.replacement and not self._joined(r):
                    print(f"{r.name}: its replacement started too late to join the run; "
                          "stopping it", file=sys.stderr)
                    continue                     # stop() ends it
                print(f"{r.name} did not exit within {grace_s:.0f} s after the run ended, though "
                      "it was not declared dead (the run's results are complete); stopping it",
                      file=sys.stderr)
                return False
            if r.proc.returncode != 0 and r.name.startswith("server"):
                print(f"{r.name} exited with status {r.proc.returncode}", file=sys.stderr)
                return False
        return True

    def _joined(self, role: Role) -> bool:
        """Did this replacement register? summary.json lists every rejoin; a worker's
        replacements join in the order they were started."""
        try:
            with open(os.path.join(self.args.out, "summary.json")) as f:
                rejoins = json.load(f).get("rejoins", [])
        except (OSError, ValueError):
            return True                          # no evidence: treat the wait as a hang
        worker = int(role.name.removeprefix("worker"))
        started = sum(1 for r in self.retired + self.roles if r.name == role.name and r.replacement)
        return sum(1 for j in rejoins if j.get("worker") == worker) >= started

    @staticmethod
    def end(role: Role) -> None:
        """SIGTERM, then SIGKILL if it has not exited within TERM_GRACE_S."""
        role.proc.terminate()
        try:
            role.proc.wait(TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            role.proc.kill()
            role.proc.wait()

    def collect(self) -> None:
        """Bring what roles on other nodes wrote into --out (Ray; elsewhere it is there),
        once: when the run has ended, or, if it failed, before its roles are stopped."""
        if hasattr(self.place, "collect") and not self.collected:
            self.collected = True
            for name in self.place.collect(self.args.out):
                print(f"{name}'s node is gone, and what it wrote with it", file=sys.stderr)

    def stop(self) -> None:
        self.collect()
        for r in self.retired:
            if r.proc.poll() is None:
                r.proc.kill()
            r.proc.wait()
        for r in self.roles:
            if r.proc.poll() is None:
                r.proc.terminate()
        deadline = time.monotonic() + TERM_GRACE_S
        for r in self.roles:
            try:
                r.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
        if hasattr(self.place, "release"):
            self.place.release()


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
