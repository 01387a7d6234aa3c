"""The cluster on Ray (``--ray ADDRESS`` / ``--ray local``): Ray places and starts the
roles; ZeroMQ still carries every message between them.

Each role is an ordinary ``python -m ps.scheduler`` / ``ps.server`` / ``worker``
process, owned by a small Ray actor, ``RoleHost`` (``ps.launch.ray_host``), on the node
Ray chose for it. This module decides where (``RayPlacement``):

- **placement by resources.** A worker asks for ``num_gpus=1`` with ``--device cuda``
  and its threads' CPUs otherwise; a server asks for one CPU and the memory its shard
  needs (``server_memory``); the servers' bundles form one placement group with the
  SPREAD strategy, so they land on different nodes where there are enough. The
  scheduler runs on the launcher's own node: it writes ``summary.json`` and its journal
  straight into ``--out``, and a restarted scheduler finds its journal there.
  ``--ray-resources ROLE:NAME=AMOUNT`` adds custom resources (a node pool, say).
- **addresses.** A role binds ``tcp://NODE_IP:*`` on its node and publishes the
  endpoint it got in a file there; its host reads the file back for the launcher.
- **outputs.** On another node, a role's ``--out`` is a staging folder of its own on
  that node; when the run ends the launcher copies every file in it (``params.npz``,
  traces, sparse-table parts) into ``--out`` here (``RayPlacement.collect``).
  Checkpoints are not copied: ``--checkpoint-dir`` must be storage every node sees,
  which ``check_shared`` verifies when the servers start.
- **failure.** A role that exits is seen by the launcher as with local processes
  (``RayProcess`` looks like a ``subprocess.Popen``), and the usual rules apply: a
  worker is replaced with --respawn, a lost server goes through --recover, a killed
  scheduler restarts from its journal. A node that disappears takes its actors with
  it: their processes get SIGKILL (``PR_SET_PDEATHSIG``) and they read as killed.

Ray is an optional dependency (``pip install .[ray]``, ``scripts/setup.sh --ray``):
this module imports it only when ``--ray`` is given.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

from ps.launch.ray_host import CALL_S, ROOT, RayProcess, RoleHost

PLACE_WAIT_S = 60.0              # how long Ray may take to place and start a role's host


def import_ray():
    """Ray, or SystemExit saying how to install it."""
    try:
        import ray
    except ImportError:
        raise SystemExit("--ray needs Ray: scripts/setup.sh --ray (or pip install '.[ray]')") from None
    return ray


def connect(address: str, cpus: int):
    """Join the Ray cluster at ADDRESS, or start a throwaway one here with ``local``
    that has at least ``cpus`` CPUs to give (as the local launcher does, the roles then
    share this machine's cores)."""
    ray = import_ray()
    env = {"env_vars": {"PYTHONPATH": ROOT}}     # RoleHost's module, on every node
    reachable(address)
    try:
        if address == "local":
            ray.init(num_cpus=max(os.cpu_count() or 1, cpus), include_dashboard=False,
                     runtime_env=env, logging_level="warning")
        else:
            ray.init(address=address, runtime_env=env, logging_level="warning")
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise RuntimeError(f"could not connect to Ray at {address}: {exc}") from None
    return ray


def reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT address must answer a TCP connection first: ray.init retries an address
    that does not for minutes before it gives up."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return                                   # auto, local, ray://...: Ray's to judge
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RuntimeError(f"nothing answers at {address} ({exc}): is the Ray head there?") from None


def server_memory(parameters: int, servers: int) -> int:
    """Bytes a server asks Ray for: its shard in float32 six times over (the parameters,
    two optimizer slots, the step's gradient sum, a pull's and a push's buffers) plus
    256 MiB for the interpreter and numpy."""
    return 6 * 4 * -(-parameters // servers) + (256 << 20)


def job_parameters(job: str) -> int:
    """How many parameters the job's model has. The launcher never imports torch, so a
    short-lived ``python -m worker.describe`` builds the model and counts them."""
    return describe(job)()


def describe(job: str):
    """Start counting the job's parameters in a child process; call the result for the count
    (so the launcher can connect to Ray meanwhile)."""
    proc = subprocess.Popen([sys.executable, "-m", "worker.describe", "--job", job], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def count() -> int:
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError("building the job's model to size the servers took over 120 s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"could not build the job's model to size the servers:\n{err[-2000:]}")
        return int(out.split()[0])
    return count


class RayPlacement:
    """Where each role runs on the Ray cluster (a placement for ``Cluster``): the
    scheduler on this node, the servers spread, the workers wherever their resources are."""

    def __init__(self, ray, args, parameters: int):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        self.ray, self.args = ray, args
        self.actor = ray.remote(num_cpus=0, max_restarts=0)(RoleHost)
        self.here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        extra = args.ray_resources
        self.server_bundle = {"CPU": 1.0, "memory": float(server_memory(parameters, args.servers)),
                              **extra.get("server", {})}
        self.worker_ask = ({"num_gpus": 1} if args.device == "cuda" else {"num_cpus": args.threads})
        self.worker_ask["resources"] = extra.get("worker", {})
        self.group = None                         # the servers' bundles, made per attempt
        self.hosts: dict[str, tuple] = {}         # role -> (actor, info), placed, not started
        self.last: dict[str, tuple] = {}          # role -> the host of its latest process
        self.started: list = []                   # every host that runs or ran a role

    # -- the placement interface (ps.launch.processes) -----------------------------
    def bind(self, name: str) -> str:
        return f"tcp://{self._host(name)[1]['address']}:*"

    def advertise(self, name: str) -> str | None:
        return None                              # each role publishes what it bound

    def command(self, name: str, cmd: list[str], env: dict) -> list[str]:
        """On another node the run's folder is the role's staging folder there."""
        staging = self._host(name)[1]["staging"]
        return [self._staged(a, staging) for a in cmd]

    def popen(self, name: str, cmd: list[str], env: dict) -> RayProcess:
        actor, info = self.hosts.pop(name) if name in self.hosts else self._host(name, keep=False)
        pid = self.ray.get(actor.start.remote(cmd, env), timeout=CALL_S)
        if self.last.get(name, (None,))[0] is not actor:
            self.started.append((name, actor, info))
        self.last[name] = (actor, info)
        return RayProcess(self.ray, actor, pid, info)

    def read(self, proc: RayProcess, path: str) -> str | None:
        return proc.take(self._staged(path, proc.info["staging"]))

    def _staged(self, path: str, staging: str | None) -> str:
        """``path`` under --out as the role sees it: under its staging folder, if it has one."""
        out = self.args.out
        if staging and (path == out or path.startswith(out + os.sep)):
            return staging + path[len(out):]
        return path

    def prepare(self, names: list[str]) -> None:
        """Place the hosts of these roles all at once (Ray starts their processes in
        parallel; placing them one by one, as spawning asks, would wait for each)."""
        todo = [n for n in names if n not in self.hosts]
        actors = {n: self._new_host(n) for n in todo}
        infos = _ready(self.ray, [actor.info.remote() for actor in actors.values()])
        if infos is None:
            for actor in actors.values():
                self.ray.kill(actor)
            raise RuntimeError(f"Ray could not place {', '.join(todo)} within {PLACE_WAIT_S:.0f} s "
                               f"(the cluster has {_show(self.ray.available_resources())} free)")
        self.hosts.update({n: (actors[n], info) for n, info in zip(todo, infos)})

    # -- Ray's side ---------------------------------------------------------------
    def _servers_group(self):
        """One bundle per server, SPREAD over the nodes (best effort: fewer nodes than
        servers still place them all)."""
        if self.group is None:
            from ray.util.placement_group import placement_group
            group = placement_group([self.server_bundle] * self.args.servers, strategy="SPREAD")
            if not _ready(self.ray, group.ready()):
                self.ray.util.remove_placement_group(group)
                raise RuntimeError(
                    f"Ray could not place {self.args.servers} servers with "
                    f"{_show(self.server_bundle)} each within {PLACE_WAIT_S:.0f} s (the "
                    f"cluster has {_show(self.ray.available_resources())} free)")
            self.group = group
        return self.group

    def _host(self, name: str, keep: bool = True) -> tuple:
        """The host that will run ``name``'s next process: placed now, started later."""
        if name in self.hosts:
            return self.hosts[name]
        if name in self.last and self._idle(self.last[name][0]):
            self.hosts[name] = self.last[name]   # a role restarted where it ran: no new host
            return self.hosts[name]
        actor = self._new_host(name)
        info = _ready(self.ray, actor.info.remote())
        if info is None:
            self.ray.kill(actor)
            raise RuntimeError(f"Ray could not place {name} within {PLACE_WAIT_S:.0f} s (the "
                               f"cluster has {_show(self.ray.available_resources())} free)")
        if keep:
            self.hosts[name] = (actor, info)
        return actor, info

    def _new_host(self, name: str):
        """Ask Ray for a host for ``name``, by the resources its role needs."""
        if name == "scheduler":
            options = {"scheduling_strategy": self.here}
        elif name.startswith("server"):
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            options = {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                self._servers_group(), placement_group_bundle_index=int(name[len("server"):])),
                "num_cpus": self.server_bundle["CPU"], "memory": self.server_bundle["memory"],
                "resources": {k: v for k, v in self.server_bundle.items() if k not in ("CPU", "memory")}}
        else:
            options = dict(self.worker_ask)
        return self.actor.options(**options).remote(name, staging=name != "scheduler")

    def _idle(self, actor) -> bool:
        """Is this host alive, with its process exited (ready to run the role again)?"""
        try:
            return self.ray.get(actor.poll.remote(), timeout=CALL_S) is not None
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError,
                self.ray.exceptions.GetTimeoutError):
            return False

    def check_shared(self, folder: str) -> None:
        """Every server's node must see ``folder`` (checkpoints are read back by whichever
        server resumes a shard): a token written here must read the same there."""
        os.makedirs(folder, exist_ok=True)
        token = uuid.uuid4().hex
        path = os.path.join(folder, f".shared-{token}")
        with open(path, "w") as f:
            f.write(token)
        try:
            for k in range(self.args.servers):
                actor, info = self._host(f"server{k}")
                if not self.ray.get(actor.sees.remote(path, token), timeout=CALL_S):
                    raise RuntimeError(
                        f"--checkpoint-dir {folder} is not shared: server{k}'s node "
                        f"({info['address']}, {info['node'][:12]}) does not see it. With --ray, "
                        "checkpoints need storage every node mounts at the same path")
        finally:
            os.remove(path)

    def location(self, proc) -> dict:
        """What cluster.json says of where a role runs."""
        return {"node": proc.info["node"], "address": proc.info["address"]}

    def collect(self, out: str) -> list[str]:
        """Copy what every role wrote on its node into ``out``; the roles whose node is
        gone are named (what they wrote is lost with it)."""
        lost = []
        for name, actor, info in self.started:
            if info["staging"] is None:
                continue
            try:
                files = self.ray.get(actor.collect.remote(), timeout=60)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError):
                lost.append(name)
                continue
            for rel, data in files.items():
                path = os.path.join(out, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".tmp", "wb") as f:
                    f.write(data)
                os.replace(path + ".tmp", path)
        return lost

    def release(self) -> None:
        """End every host of this attempt (their processes get SIGKILL with them), once
        each has removed its staging folder."""
        actors = [actor for _, actor, _ in self.started] + [a for a, _ in self.hosts.values()]
        try:
            self.ray.wait([a.discard.remote() for a in actors], num_returns=len(actors), timeout=10)
        except Exception:          # noqa: BLE001 -- best effort: the hosts die next anyway
            pass
        for actor in actors:
            self.ray.kill(actor, no_restart=True)
        self.started, self.hosts, self.last = [], {}, {}
        if self.group is not None:
            self.ray.util.remove_placement_group(self.group)
            self.group = None


def _ready(ray, ref):
    """``ray.get(ref)`` within PLACE_WAIT_S, or None (Ray waits forever for resources)."""
    try:
        return ray.get(ref, timeout=PLACE_WAIT_S)
    except ray.exceptions.GetTimeoutError:
        return None


def _show(resources: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                     for k, v in sorted(resources.items()) if not k.startswith("node:"))
