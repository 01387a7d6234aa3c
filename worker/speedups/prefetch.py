"""The next step's pull, sent ahead of time (``--prefetch``): when, and the one in flight.

``push`` (the default): right behind this worker's push, on the same connections; a
server takes a connection's messages in order, so the pull sees the push (a worker
reads its own writes) and its reply travels while the worker collects the push's
acknowledgements, reports (and, when it pushed from backward hooks, leases). In BSP the
server parks it until the step's last push is in (version t+1 exists only then) and
answers it that moment, with no request after the step's end to wait for (char
transformer, 2 cores: 3-4% a step). ``compute`` (SSP/ASP only): as soon as the current
step's parameters are in, so the transfer hides behind compute; but its answer may
then lack this worker's own last push (a read the server counts at least 1 clock
stale, still within s, and measured to hurt convergence). ``off``: never.

Double-buffered either way: the reply lands in zmq's receive buffers (its frames are
the second buffer) and is copied into the model's flat buffer only by the next pull,
so the model is never written while it computes (a task stolen after the push still
computes on version t) and the frame -> model copy stays the only one. The server's
gate holds a prefetch like any pull: no SSP read is ever staler than s clocks, and a
BSP one is exactly version t+1. One is in flight at a time, never past the last step.
"""
from __future__ import annotations


class Prefetch:
    def __init__(self, shards, setting: str, mode: str, steps: int):
        self.shards = shards          # the ShardClient (or a test's stand-in)
        self.setting = setting        # --prefetch: "push", "compute" or "off"
        self.mode = mode              # "bsp", "ssp" or "asp"
        self.steps = steps            # the run's step count: no pull past it
        self.pending: tuple[int, list[int]] | None = None   # (step, rids) in flight

    def wanted(self, step: int, when: str) -> bool:
        """Whether to send the pull for ``step`` now, at moment ``when``."""
        return (self.setting == when and (self.mode != "bsp" or when == "push")
                and self.pending is None and step < self.steps)

    def send(self, step: int, when: str) -> None:
        """Send the pull for ``step`` now, if ``--prefetch`` is ``when`` (SSP/ASP: "compute")."""
        if self.wanted(step, when):
            self.pending = self.shards.pull_send(step)

    def behind(self, step: int, ends_clock: bool = True) -> int | None:
        """The step to pull right behind a push of ``step`` (``--prefetch push``), or None.
        BSP and SSP: the next step or clock; ASP: the same (only for staleness). A push
        that does not end the clock (a task dealt again, pushed alone) sends none."""
        then = step + (self.mode != "asp")
        return then if ends_clock and self.wanted(then, "push") else None

    def sent_behind(self, then: int | None) -> None:
        """A push went out with ``then``'s pull behind it (``ShardClient.ahead`` holds it)."""
        if then is not None:
            self.pending = self.shards.ahead

    def take(self, step: int):
        """The pull in flight if it is for ``step`` (in ASP, whose pulls are answered at
        once, for any step), for ``pull_into(pending=)``; else drop it (its reply is
        ignored) and return None."""
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] != step and self.mode != "asp":
            self.shards.abandon(pending)
            return None
        return pending

    def drop(self) -> None:
        """Training is over: a pull still in flight was sent before the others' last
        pushes, so it is never the final version; nobody will take it."""
        if self.pending is not None:
            self.shards.abandon(self.pending)
            self.pending = None
