"""The worker's heartbeat: a thread that tells the scheduler "still alive" (Paranoid Pirate).

A worker's main thread may spend seconds inside one backward pass, so liveness
cannot ride on its requests: this thread sends a HEARTBEAT every interval on its
own socket (zmq sockets are not shared between threads). If the scheduler answers
that our incarnation was fenced (declared dead: we were paused or cut off for too
long), ``fenced`` is set and the main loop stops: a retired incarnation must not
keep pushing.
"""
from __future__ import annotations

import logging
import threading

import zmq

from ps.faults import messages
from ps.wire.client import Peer, RemoteError
from ps.scheduler.membership import HEARTBEAT_INTERVAL_S
from ps.wire.protocol import Error, Kind

log = logging.getLogger("worker")


class Fenced(RuntimeError):
    """The scheduler declared this incarnation dead; it must stop."""


def as_fenced(exc: RemoteError) -> Exception:
    """A refusal to raise: ``Fenced`` if it says we were declared dead, else itself."""
    return Fenced(exc.reason) if exc.code == Error.FENCED else exc


class Heartbeat(threading.Thread):
    def __init__(self, ctx: zmq.Context, endpoint: str, worker: int, inc: int,
                 interval_s: float = HEARTBEAT_INTERVAL_S):
        super().__init__(name="heartbeat", daemon=True)
        self.peer = Peer(ctx, endpoint, "scheduler")
        self.worker, self.inc, self.interval_s = worker, inc, interval_s
        self.fenced = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.wait(self.interval_s):
                try:                # a heartbeat not answered in time is abandoned, not kept
                    self.peer.request(Kind.HEARTBEAT, 10 * self.interval_s, role="worker",
                                      index=self.worker, inc=self.inc, **messages.fields())
                except RemoteError as exc:
                    if exc.code == Error.FENCED:
                        log.error("the scheduler declared this worker dead: %s", exc.reason)
                        self.fenced.set()
                        return
                except TimeoutError:
                    continue        # the scheduler is busy or gone; the main loop's deadlines decide
        finally:
            self.peer.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=2 * self.interval_s + 1)
