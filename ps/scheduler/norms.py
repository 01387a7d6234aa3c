"""Clipping's norm agreement: the shards of a BSP step agree on its global gradient norm.

``clip_grad_norm_`` scales a step's whole gradient by ``max_norm / (norm + 1e-6)`` (at
most 1), where ``norm`` is the L2 norm of the mean gradient across every parameter. Each
shard holds only its slice, so none can step alone. The exchange, one round trip per
step through the scheduler, which every server already talks to:

    shard k, step t complete        scheduler                         every shard
    NORM(step=t, sumsq=|g_k|^2) --> parts[t][k] = sumsq
                                    all S parts in: total = sqrt(sum)
                                <-- OK(norm_step=t, total_norm) ----> apply step t, scaled

A shard holds its complete step until the answer comes (``ps.core.shard``), and resends its
NORM until it does: the exchange is idempotent by (step, shard), so a resend, a duplicate,
or a NORM to a scheduler restarted from its journal (the shards resend after registering
again) gives the same total. The scheduler never sees a tensor: S floats in, one out.

``NormExchange`` is that bookkeeping, pure; ``Scheduler.on_norm`` receives and replies.
"""
from __future__ import annotations

import math
from collections import OrderedDict

KEEP_TOTALS = 8     # totals of recent steps kept to answer a late resend (a shard that did not
                    # hear the answer); a shard is never more than one step behind the others


class NormExchange:
    """The squared norms of each step's slices, by shard, until all S have come."""

    def __init__(self, shards: int):
        self.shards = shards
        self.parts: dict[int, dict[int, float]] = {}           # step -> shard -> sumsq
        self.waiting: dict[int, dict[int, tuple]] = {}         # step -> shard -> who to answer
        self.totals: OrderedDict[int, float] = OrderedDict()   # step -> global norm, recent

    def offer(self, step: int, shard: int, sumsq: float, who) -> list[tuple] | None:
        """Shard ``shard``'s part of step ``step``. Returns who to answer, and with
        ``total(step)``, once every shard's part is in (the step's earlier askers and this
        one; only this one for a step already agreed); None while parts are missing."""
        if step in self.totals:
            return [who]
        self.parts.setdefault(step, {})[shard] = sumsq        # a resend overwrites its own part
        self.waiting.setdefault(step, {})[shard] = who
        if len(self.parts[step]) < self.shards:
            return None
        # Summed in shard order, so every answer (and a resend's) is the same float.
        parts = self.parts.pop(step)
        self.totals[step] = math.sqrt(math.fsum(parts[k] for k in range(self.shards)))
        if len(self.totals) > KEEP_TOTALS:
            self.totals.popitem(last=False)
        return list(self.waiting.pop(step).values())

    def total(self, step: int) -> float:
        return self.totals[step]
