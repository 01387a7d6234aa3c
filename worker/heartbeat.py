"""The worker's heartbeat: a thread that tells the scheduler "still alive" (Paranoid Pirate).

A worker's main thread may spend seconds inside one backward pass, so liveness
cannot ride on its requests: this thread sends a HEARTBEAT every interval on its
own socket (zmq sockets are not shared between threads). The replies tell the
worker when to stop, and ``check`` (which the worker calls wherever it waits, see
``Peer.check``) raises the reason:

- ``Fenced``: the scheduler answers that our incarnation was declared dead (we were
  paused or cut off for too long); a retired incarnation must not keep pushing.
- the scheduler's ``run_over`` refusal (a ``RemoteError``): a job error on some
  worker failed the run.
- ``SchedulerLost``: no heartbeat answered for ``lost_after_s``, the same liveness
  rule seen from the worker's side. That is the scheduler's dead-after time (its
  REGISTER reply says it) plus RESTART_ALLOWANCE_S: by then a live scheduler has
  declared us dead anyway, and a killed one that a launcher starts again from its
  journal has had time to come back. Without it, a worker whose scheduler is gone
  would retry each request until its --timeout-s.

Silence is counted from the first heartbeat that went unanswered, never from the
last answer: a worker paused by SIGSTOP wakes with a stale clock, so a heartbeat
whose wait overran by far (it spanned the pause) starts the count only when it ends.
"""
from __future__ import annotations

import logging
import threading
import time

import zmq

from ps.faults import messages
from ps.wire.client import Peer, RemoteError
from ps.wire.protocol import DEAD_AFTER_S, HEARTBEAT_INTERVAL_S, Error, Kind

log = logging.getLogger("worker")

RESTART_ALLOWANCE_S = 5.0   # beyond the dead-after time: a killed scheduler started again
                            # from its journal (about a second, with the launcher) finds us
REPLY_WAIT_BEATS = 2        # a heartbeat not answered within 2 intervals (1 s) is abandoned,
                            # and counts as unanswered; it is resent every 0.25 s meanwhile


class Fenced(RuntimeError):
    """The scheduler declared this incarnation dead; it must stop."""


class SchedulerLost(RuntimeError):
    """No heartbeat answered for ``lost_after_s``: the scheduler is gone, or cut off from us."""


def as_fenced(exc: RemoteError) -> Exception:
    """A refusal to raise: ``Fenced`` if it says we were declared dead, else itself."""
    return Fenced(exc.reason) if exc.code == Error.FENCED else exc


def lost_after(dead_after_s) -> float:
    """How long heartbeats may go unanswered before the scheduler counts as lost, given the
    dead-after time its REGISTER reply carried (the default if absent or not a sane number)."""
    if not (isinstance(dead_after_s, (int, float)) and not isinstance(dead_after_s, bool)
            and 0 < dead_after_s < 1e6):
        dead_after_s = DEAD_AFTER_S
    return dead_after_s + RESTART_ALLOWANCE_S


class Heartbeat(threading.Thread):
    def __init__(self, ctx: zmq.Context, endpoint: str, worker: int, inc: int,
                 interval_s: float = HEARTBEAT_INTERVAL_S,
                 lost_after_s: float = DEAD_AFTER_S + RESTART_ALLOWANCE_S):
        super().__init__(name="heartbeat", daemon=True)
        self.peer = Peer(ctx, endpoint, "scheduler")
        self.worker, self.inc, self.interval_s = worker, inc, interval_s
        self.lost_after_s = lost_after_s
        self.reply_wait_s = REPLY_WAIT_BEATS * interval_s
        self.fenced = threading.Event()
        self.stopping = threading.Event()
        self.verdict: Exception | None = None     # run_over, or SchedulerLost: why to stop

    def run(self) -> None:
        silent_since = None          # when the first heartbeat of this silence was sent
        due = time.monotonic() + self.interval_s
        try:
            while not self.stopping.wait(max(0.0, due - time.monotonic())):
                sent = time.monotonic()
                due = sent + self.interval_s         # one every interval, or back to back
                try:
                    self.peer.request(Kind.HEARTBEAT, self.reply_wait_s, role="worker",
                                      index=self.worker, inc=self.inc, **messages.fields())
                    silent_since = None
                except RemoteError as exc:
                    silent_since = None          # refused, but answered: the scheduler is there
                    if exc.code == Error.FENCED:
                        log.error("the scheduler declared this worker dead: %s", exc.reason)
                        self.fenced.set()
                        return
                    if exc.code == Error.RUN_OVER:
                        self.verdict = exc
                        return
                except TimeoutError:
                    now = time.monotonic()
                    if silent_since is None:     # a wait far longer than asked spanned a
                        paused = now - sent > 2 * self.reply_wait_s     # pause: count from now
                        silent_since = now if paused else sent
                    if now - silent_since >= self.lost_after_s:
                        self.verdict = SchedulerLost(
                            f"no heartbeat answered by the scheduler ({self.peer.endpoint}) for "
                            f"{self.lost_after_s:.1f} s: it is gone, or cut off from this worker")
                        return
        finally:
            self.peer.close()

    def check(self) -> None:
        """Raise why this worker must stop, once a heartbeat has told (see above)."""
        if self.fenced.is_set():
            raise Fenced(f"worker {self.worker} incarnation {self.inc} was declared dead")
        if self.verdict is not None:
            raise self.verdict

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=self.reply_wait_s + self.interval_s + 1)
