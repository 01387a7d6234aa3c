"""Message faults in the transport: drop, duplicate or delay what a process sends.

For fault-injection runs only (``start_cluster.sh --inject drop:0.02`` and friends,
which reach every role as ``PS_NET_FAULTS``). Every send of every role goes through
``send``; with faults configured, each message is, independently and seeded, dropped
with probability ``drop``, sent twice with probability ``dup``, and sent only after
``delay_ms``. What survives it is the protocol: requests are retried with the same
request id (Lazy Pirate, ``ps.wire.client.Peer``) and every handler is idempotent by id.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

ENV = "PS_NET_FAULTS"            # e.g. "drop=0.02,dup=0.02,delay_ms=5,seed=1"


@dataclass
class NetFaults:
    drop: float = 0.0
    dup: float = 0.0
    delay_ms: float = 0.0
    seed: int = 0

    def __post_init__(self):
        self.rng = random.Random(self.seed * 7919 + os.getpid())   # per process, reproducible per pid
        self.dropped = self.duplicated = 0

    @property
    def active(self) -> bool:
        return bool(self.drop or self.dup or self.delay_ms)

    @classmethod
    def parse(cls, text: str) -> "NetFaults":
        fields = dict(item.split("=", 1) for item in text.split(",") if item)
        return cls(float(fields.get("drop", 0)), float(fields.get("dup", 0)),
                   float(fields.get("delay_ms", 0)), int(fields.get("seed", 0)))

    def send(self, sock, frames, **kwargs):
        if not self.active:
            return sock.send_multipart(frames, **kwargs)
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)
        if self.rng.random() < self.drop:
            self.dropped += 1
            return None
        result = sock.send_multipart(frames, **kwargs)
        if self.rng.random() < self.dup:
            self.duplicated += 1
            sock.send_multipart(frames, **{k: v for k, v in kwargs.items() if k != "track"})
        return result


_faults = NetFaults()


def configure_from_env() -> None:
    """Called once by each role's main()."""
    global _faults
    _faults = NetFaults.parse(os.environ.get(ENV, ""))


def send(sock, frames, **kwargs):
    return _faults.send(sock, frames, **kwargs)
