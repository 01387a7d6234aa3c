"""Message faults: drop, duplicate or delay what a process sends (a socket wrapper).

For fault-injection runs only: ``start_cluster.sh --inject drop:0.02`` (and ``dup:P``,
``delay:Dms``) reaches every role as ``PS_NET_FAULTS``. Each role's ``main`` calls
``install_from_env(role)`` once; only when that variable asks for a fault does it make
``FaultySocket`` the class of every socket the process then creates
(``ps.wire.transport.make_socket`` asks ``socket_class()``). Without faults nothing is
installed: the sockets are plain ``zmq.Socket``s, and a send is ``send_multipart``
with nothing in between.

A ``FaultySocket`` delays each message by ``delay_ms``, then drops it with
probability ``drop``, or sends it and, with probability ``dup``, sends it again.
What survives it is the protocol: requests are retried with the same request id
(Lazy Pirate, ``ps.wire.client.Peer``) and every handler is idempotent by id.

Reproducible: each socket draws from its own generator, seeded from the run's seed,
the role's name ("scheduler", "server1", "worker0") and the socket's number in the
process (sockets are made in the same order every run), so the n-th send of a socket
meets the same fate in every run; which message is the n-th still depends on timing
(retries, heartbeats). A replacement worker has its predecessor's name and draws the
same streams again from their start, not their continuation.

Counted: ``counts()`` (dropped, duplicated, delayed) goes to the scheduler in servers'
stats and workers' heartbeats (``fields()``); the scheduler adds its own and writes
them all, by role, in summary.json's ``net_faults``, so a test can check that the
faults fired.
"""
from __future__ import annotations

import itertools
import os
import random
import threading
import time
from dataclasses import dataclass

import zmq

ENV = "PS_NET_FAULTS"            # e.g. "drop=0.02,dup=0.02,delay_ms=5,seed=1"
COUNTERS = ("dropped", "duplicated", "delayed")


@dataclass(frozen=True)
class NetFaults:
    """What ``PS_NET_FAULTS`` asks for."""
    drop: float = 0.0            # probability that a message is not sent
    dup: float = 0.0             # probability that a sent message is sent twice
    delay_ms: float = 0.0        # every message waits this long before it leaves
    seed: int = 0                # the run's seed

    @property
    def active(self) -> bool:
        return bool(self.drop or self.dup or self.delay_ms)

    @classmethod
    def parse(cls, text: str) -> "NetFaults":
        fields = dict(item.split("=", 1) for item in text.split(",") if item)
        return cls(float(fields.get("drop", 0)), float(fields.get("dup", 0)),
                   float(fields.get("delay_ms", 0)), int(fields.get("seed", 0)))


_faults: NetFaults | None = None        # set by install: this process's faults
_role = ""                              # and its name (the streams' seed)
_sockets = itertools.count()            # sockets made so far (each has its own stream)
_counts = dict.fromkeys(COUNTERS, 0)    # this process's totals; sockets of several threads
_lock = threading.Lock()                # (a worker's heartbeat) add to them


class FaultySocket(zmq.Socket):
    """A socket whose every send meets this process's message faults."""
    rng: random.Random           # declared: zmq.Socket takes only declared attributes

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng = random.Random(f"{_faults.seed}/{_role}/{next(_sockets)}")

    def send_multipart(self, msg_parts, flags=0, copy=True, track=False, **kwargs):
        """Send, drop or send twice. With ``track`` (a server replying from its live
        buffer) the tracker returned covers both copies of a duplicate: the buffer may
        change only once neither is still being sent. A dropped message returns None,
        like a reply to a peer that has gone."""
        if _faults.delay_ms:
            time.sleep(_faults.delay_ms / 1000)
            _count("delayed")
        if self.rng.random() < _faults.drop:
            _count("dropped")
            return None
        sent = super().send_multipart(msg_parts, flags, copy, track, **kwargs)
        if self.rng.random() < _faults.dup:
            _count("duplicated")
            again = super().send_multipart(msg_parts, flags, copy, track, **kwargs)
            if track:
                return zmq.MessageTracker(sent, again)
        return sent


def _count(counter: str) -> None:
    with _lock:
        _counts[counter] += 1


def install_from_env(role: str) -> None:
    """Called once by each role's main: make every socket this process creates from now
    on a ``FaultySocket``, if ``PS_NET_FAULTS`` asks for a fault; otherwise do nothing."""
    global _faults, _role
    faults = NetFaults.parse(os.environ.get(ENV, ""))
    if faults.active:
        _faults, _role = faults, role


def socket_class() -> type:
    """The class of the sockets this process makes (``ps.wire.transport.make_socket``)."""
    return zmq.Socket if _faults is None else FaultySocket


def counts() -> dict[str, int] | None:
    """This process's message faults so far, or None where none are installed."""
    if _faults is None:
        return None
    with _lock:
        return dict(_counts)


def fields() -> dict:
    """What a server adds to its stats and a worker to its heartbeat: ``net_faults``,
    this process's counts, where faults are installed; nothing otherwise."""
    return {} if _faults is None else {"net_faults": counts()}
