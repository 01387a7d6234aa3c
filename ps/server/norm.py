"""A server's side of clipping's norm agreement (BSP with a job's ``CLIP_GRAD_NORM``).

A shard that has a whole step holds it (``ps.core.shard``, ``norm_wait``); the server sends
its part of the squared norm to the scheduler (NORM), again every ``NORM_RETRY_S`` until
the answer comes, and right after registering again with a restarted scheduler. The
answer (``norm_step``, ``total_norm``, ``skip``) is the whole step's global norm, summed
by the scheduler over every shard's part (``ps.scheduler.norms``); the server's event loop
hands it to ``answer``, then applies the step. ``NormExchange`` keeps only the sending
side's state: when to resend, which request ids were ours, how long steps were held.
"""
from __future__ import annotations

import time

from ps.wire.protocol import Error, Kind, ProtocolError

NORM_RETRY_S = 0.25              # a NORM unanswered this long is sent again (Lazy Pirate's interval)
RIDS_KEPT = 64                   # request ids of our recent NORMs (an error reply names one)


class NormExchange:
    def __init__(self, scheduler, index: int, inc: int, nonfinite: str):
        self.scheduler, self.index, self.inc, self.nonfinite = scheduler, index, inc, nonfinite
        self.resend_at: float | None = None      # while a step is held: when to send again
        self.rids: set[int] = set()              # request ids of our recent NORMs
        self.held_at = 0.0                       # when the held step's NORM first went
        self.steps, self.held_s = 0, 0.0         # steps held, and for how long in all

    def start(self, shard) -> None:
        """The shard has just held a complete step: send its part, the first time."""
        if shard.norm_wait is not None and self.resend_at is None:
            self.held_at = time.perf_counter()
            self.send(shard)

    def send(self, shard) -> None:
        """Our part of the held step's squared norm, to the scheduler."""
        rid = self.scheduler.send(Kind.NORM, want_reply=False, index=self.index, inc=self.inc,
                                  step=shard.norm_wait, sumsq=shard.partial_sumsq,
                                  nonfinite=self.nonfinite)
        self.rids = {rid} | {r for r in self.rids if r > rid - RIDS_KEPT}
        self.resend_at = time.monotonic() + NORM_RETRY_S

    def due(self, shard, now: float) -> float | None:
        """Resend if it is time; the seconds until the next resend (None: nothing held)."""
        if self.resend_at is None:
            return None
        if now >= self.resend_at:
            self.send(shard)
        return max(0.0, self.resend_at - now)

    def answer(self, header: dict, shard) -> tuple[int, float, bool] | None:
        """A scheduler reply holding a norm: (step, total, skip) for the held step, or None
        for a repeat of an answer already applied; a malformed one is refused."""
        step, total, skip = header["norm_step"], header.get("total_norm"), header.get("skip")
        if not (isinstance(step, int) and isinstance(total, (int, float))
                and isinstance(skip, bool)):
            raise ProtocolError(Error.BAD_FIELD, "a norm reply needs norm_step, total_norm, skip")
        if shard.norm_wait != step:
            return None
        self.steps += 1                          # held from our NORM until here: the exchange
        self.held_s += time.perf_counter() - self.held_at
        self.resend_at = None
        return step, float(total), skip

    def stats(self) -> dict:
        return {"steps": self.steps, "held_s": round(self.held_s, 6)}
