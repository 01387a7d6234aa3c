"""A simulated multi-node Ray cluster for the Ray tests and benchmark, run in a
loopback-only network namespace (``ip netns exec NS python tests/raycluster.py``).

``ray.cluster_utils.Cluster`` starts a head and one raylet per node on this machine;
each node here carries a custom resource of its own name, so the tests can see where
Ray placed a role, and a role's kind (``srv``, ``wk``), so the launcher can be told
where servers and workers go (``--ray-resources server:srv=1``). It talks in JSON lines:
it prints ``{"address": ..., "nodes": {name: node_id}}`` once the nodes are up, then
reads commands from stdin: ``remove NAME`` removes that node (its raylet and every
process on it) and prints ``{"removed": NAME, "at": wall time}``; ``status ENDPOINT``
asks a scheduler in the namespace for its STATUS and prints it (``{}`` if it did not
answer); end of input shuts the cluster down.

    NODES: "s0=srv,s1=srv,w0=wk,w1=wk" (the default) -- name=kind, each 1 CPU
"""
import json
import os
import sys
import time

import ray
import zmq
from ray.cluster_utils import Cluster

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ps.wire.client import Peer, RemoteError  # noqa: E402
from ps.wire.protocol import Kind  # noqa: E402


def status(endpoint: str) -> dict:
    ctx = zmq.Context()
    try:
        return Peer(ctx, endpoint, "scheduler").request(Kind.STATUS, 1.0)[0]
    except (TimeoutError, RemoteError):
        return {}
    finally:
        ctx.destroy(linger=0)


def main() -> None:
    spec = sys.argv[1] if len(sys.argv) > 1 else "s0=srv,s1=srv,w0=wk,w1=wk"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "resources": {"head": 1}, "include_dashboard": False})
    nodes = {}
    for item in spec.split(","):
        name, kind = item.split("=")
        nodes[name] = cluster.add_node(num_cpus=1, resources={name: 1, kind: 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="warning")
    ids = {"head": None}
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


if __name__ == "__main__":
    main()
