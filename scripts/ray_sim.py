"""A simulated multi-node Ray cluster on this machine, in a loopback-only network namespace:
for trying ``--ray`` without a cluster, and for the Ray tests and benchmark.

    sudo python scripts/ray_sim.py [NODES]     # prints the address, then waits for Ctrl-C
    sudo ip netns exec NS scripts/start_cluster.sh --ray ADDRESS --ray-resources ...

Ray binds the machine's first network address; in a namespace whose only link is ``lo``
that is 127.0.0.1, so nothing is reachable from outside. ``ray.cluster_utils.Cluster``
starts a head (no CPUs: the launcher and the scheduler live there) and one raylet per
node. Each node carries a custom resource of its own name, so a test can see where Ray
placed a role, and one of its kind, so the launcher can be told where servers and workers
go (``--ray-resources server:srv=1 --ray-resources worker:wk=1``)::

    NODES: "s0=srv,s1=srv,w0=wk,w1=wk,w2=wk" (the default) -- name=kind; a worker node
    has 1 CPU and wk=1, a server node 2 CPUs and srv=2 (room for a second server, when
    the other server node is gone)

Two halves. ``Simulated`` (here, as root) makes the namespace and starts this file
inside it as the *holder*, which owns the Ray cluster and answers JSON lines: first
``{"address": ..., "nodes": {name: node_id}}``, then one reply per command read from
stdin -- ``remove NAME`` removes that node (its raylet and every process on it) and
answers ``{"removed": NAME, "at": wall time}``; ``status ENDPOINT`` answers a STATUS
request to a scheduler in the namespace (``{}`` if it did not answer). End of input
shuts the cluster down; ``Simulated.close`` then deletes the namespace.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import select
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES = "s0=srv,s1=srv,w0=wk,w1=wk,w2=wk"
ON_NODES = ["--ray-resources", "server:srv=1", "--ray-resources", "worker:wk=1"]


class Unavailable(RuntimeError):
    """No simulated cluster here: Ray, root or network namespaces are missing (why)."""


class Simulated:
    """The simulated cluster, seen from outside its namespace ``ns``."""

    def __init__(self, nodes: str = NODES, up_timeout_s: float = 90.0):
        if importlib.util.find_spec("ray") is None:
            raise Unavailable("Ray is not installed (scripts/setup.sh --ray)")
        self.ns = loopback_namespace(f"rayns-{os.getpid()}")
        self.proc = None
        try:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, os.path.abspath(__file__), "--hold",
                 nodes],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True, start_new_session=True)
            up = self.reply(up_timeout_s)
        except BaseException:
            self.close()
            raise
        self.address, self.nodes = up["address"], up["nodes"]
        self.names = {v: k for k, v in self.nodes.items()}    # node id -> name

    def reply(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"the simulated Ray cluster did not answer within {timeout_s} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulated Ray cluster exited")
        return json.loads(line)

    def ask(self, command: str, timeout_s: float = 30.0) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.reply(timeout_s)

    def remove(self, name: str) -> float:
        """Remove node NAME; the wall time it was gone."""
        return self.ask(f"remove {name}")["at"]

    def status(self, endpoint: str) -> dict:
        return self.ask(f"status {endpoint}", 10.0)

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait()
        delete_namespace(self.ns)


def loopback_namespace(name: str) -> str:
    """Make network namespace ``name`` with ``lo`` up and nothing else (Unavailable: why not)."""
    if os.geteuid() != 0:
        raise Unavailable("a network namespace needs root")
    try:
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10)
    except OSError as exc:
        raise Unavailable(f"no `ip` command: {exc}") from None
    if made.returncode != 0:
        raise Unavailable(f"`ip netns add` fails here: {made.stderr.strip()}")
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
    return name


def delete_namespace(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


# -- the holder, inside the namespace ------------------------------------------------------
def status(endpoint: str) -> dict:
    import zmq
    sys.path.insert(0, ROOT)
    from ps.wire.client import Peer, RemoteError
    from ps.wire.protocol import Kind
    ctx = zmq.Context()
    try:
        return Peer(ctx, endpoint, "scheduler").request(Kind.STATUS, 1.0)[0]
    except (TimeoutError, RemoteError):
        return {}
    finally:
        ctx.destroy(linger=0)


def hold(spec: str) -> None:
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "resources": {"head": 1}, "include_dashboard": False})
    nodes = {}
    for item in spec.split(","):
        name, kind = item.split("=")
        room = 2 if kind == "srv" else 1
        nodes[name] = cluster.add_node(num_cpus=room, resources={name: 1, kind: room})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="warning")
    ids = {}
    for node in ray.nodes():
        for name in [*nodes, "head"]:
            if name in node["Resources"]:
                ids[name] = node["NodeID"]
    print(json.dumps({"address": cluster.address, "nodes": ids}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["remove"]:
            cluster.remove_node(nodes.pop(words[1]))
            print(json.dumps({"removed": words[1], "at": time.time()}), flush=True)
        elif words[:1] == ["status"]:
            print(json.dumps(status(words[1])), flush=True)
    ray.shutdown()
    cluster.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(prog="scripts/ray_sim.py",
                                description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("nodes", nargs="?", default=NODES, help="name=kind,... (default: %(default)s)")
    p.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)   # inside the namespace
    args = p.parse_args()
    if args.hold:
        hold(args.nodes)
        return
    try:
        sim = Simulated(args.nodes)
    except Unavailable as exc:
        raise SystemExit(str(exc)) from None
    try:
        print(f"a simulated Ray cluster: nodes {', '.join(sim.nodes)} at {sim.address}, in the "
              f"network namespace {sim.ns}; try\n  ip netns exec {sim.ns} scripts/start_cluster.sh "
              f"--ray {sim.address} {' '.join(ON_NODES)}\nCtrl-C ends it.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sim.close()


if __name__ == "__main__":
    main()
