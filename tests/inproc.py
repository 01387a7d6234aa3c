"""A real server (``ps.server.server.Server``) in the test's own process, driven by hand.

No scheduler: the shard is set up directly, and the test moves each request along
itself (``serve_one``: receive one message from the server's ROUTER, exactly as its
event loop does, and hand it to ``Server.handle``). Real sockets and real zmq
frames on both sides, so what a test measures here (addresses, allocations,
counters, bytes on the wire) is what a live server does, without a second process.
"""
from __future__ import annotations

import sys

import numpy as np
import zmq

from cluster import ROOT

sys.path.insert(0, ROOT)
from ps.wire.client import ShardClient, ShardInfo  # noqa: E402
from ps.server.server import Server  # noqa: E402
from ps.server.config import ServerConfig  # noqa: E402
from ps.core.shard import Shard  # noqa: E402


class InProcessServer:
    """One shard of ``size`` floats (SGD, BSP unless told) and a ShardClient for worker 0."""

    def __init__(self, size: int, mode: str = "bsp", grad_dtype: str = "float32",
                 param_dtype: str = "float32", optimizer: dict | None = None):
        self.server = Server(ServerConfig("tcp://127.0.0.1:1", timeout_s=5.0))   # never contacted
        s = self.server
        s.index, s.inc, s.lo, s.hi = 0, 1, 0, size
        s.shard = Shard(size, optimizer or {"name": "sgd", "lr": 0.1}, mode, 0, 1)
        s.checkpoints = None                     # no --checkpoint-every
        self.ctx = zmq.Context()
        self.client = ShardClient(self.ctx, [ShardInfo(0, s.endpoint, 0, size)], worker=0,
                                  timeout_s=5.0, incarnation=7, grad_dtype=grad_dtype,
                                  param_dtype=param_dtype)
        self.received: list = []          # the frames of every request served, as received

    def serve_one(self, timeout_s: float = 5.0) -> list:
        """Receive one request (zero-copy frames, as the event loop does) and handle it."""
        assert self.server.router.poll(int(timeout_s * 1000)), "no request reached the server"
        frames = self.server.router.recv_multipart(copy=False)
        self.received.append(frames)
        self.server.handle(frames)
        return frames

    def init(self, values: np.ndarray) -> None:
        from ps.wire.protocol import Kind
        peer = self.client.peers[0]
        rid = peer.send(Kind.INIT, [memoryview(values)], worker=0, inc=7, lo=0,
                        dtype="float32", size=values.size)
        self.serve_one()
        peer.recv(rid, 5.0, "init")

    def close(self) -> None:
        self.client.close()
        self.ctx.destroy(linger=0)
        self.server.close()
