"""Push while backward runs: each shard's gradient leaves as soon as it is complete.

Backward produces gradients from the last layer to the first, so the shard holding
the last layers is complete long before backward ends. On a worker's **last own task
of a BSP step** (its lease, or the lease asked ahead after it, said ``left`` 0:
nothing more will be added to the flat gradient sum from its own deque), ``Overlap.arm`` turns on
hooks registered once on every parameter (``register_post_accumulate_grad_hook``,
which runs after autograd has added into ``p.grad``, a view of the flat buffer). Per
shard it counts the parameters whose flat range overlaps the shard's ``[lo, hi)``;
when the last of them has accumulated, the shard's slice ``grads[lo:hi]`` is final
and its push is sent from the hook, without waiting for the reply. ``finish`` (after
backward) sends any shard whose hooks never ran (parameters unused by the loss) and
waits for every reply, as the whole-gradient push does.

What it buys: the transfer of all shards but the first-layer one hides behind the
rest of backward. Only the last own task of a step can overlap: earlier tasks'
gradients are still to be summed with later ones.

Off (the whole-gradient push after backward) on CUDA, where the gradient must first
come down to host memory and a per-shard copy from inside backward would synchronise
the stream; in SSP and ASP (a clock's push also moves this worker's clock, and a task
stolen after it would belong to an already-ended clock); with ``--crash-at`` (its
fault points name moments of the whole push); under ``--slow`` or ``--jitter`` (the
emulated delay is slept after backward: an overlapped push would leave before it, as a
really slow worker's would not); and unless ``--overlap`` asks for it: it measured no
gain on a 2-core CPU machine (1,440 vs 1,441 samples/s), so the plain path is the default.
Hooks run in the thread that called ``backward`` (CPU autograd does), the only
thread that uses the shard sockets.
"""
from __future__ import annotations

import time

import torch

from ps.trace import Tracer
from ps.wire.client import ShardClient
from worker.flat import FlatModel


class Overlap:
    def __init__(self, model: torch.nn.Module, flat: FlatModel, shards: ShardClient,
                 tracer: Tracer):
        self.flat, self.shards, self.tracer = flat, shards, tracer
        self.need = [0] * len(shards.shards)          # per shard: parameters overlapping it
        offset = 0
        for _, p in model.named_parameters():        # the FlatModel's order
            n = p.numel()
            if not p.requires_grad:                  # never accumulates: finish() sends it
                offset += n
                continue
            cover = [k for k, s in enumerate(shards.shards) if offset < s.hi and s.lo < offset + n]
            for k in cover:
                self.need[k] += 1
            p.register_post_accumulate_grad_hook(self._hook(cover))
            offset += n
        self.armed: dict | None = None                # the push being sent, while armed

    def arm(self, step: int, tasks: list[int], samples: int, step_tasks: int) -> None:
        """The next backward completes this step's gradient sum: push shards as they fill."""
        self.armed = dict(step=step, tasks=tasks, samples=samples, step_tasks=step_tasks,
                          left=list(self.need), sent={})

    def _hook(self, cover: list[int]):
        def on_accumulated(_param: torch.Tensor) -> None:
            if self.armed is None:                    # not the step's last task: a no-op
                return
            for k in cover:
                self.armed["left"][k] -= 1
                if self.armed["left"][k] == 0:
                    self._send(k)
        return on_accumulated

    def _send(self, k: int) -> None:
        a = self.armed
        t0 = time.time()
        a["sent"][k] = self.shards.push_send(self.flat.grads_np, a["step"], a["tasks"],
                                             a["samples"], a["step_tasks"],
                                             only=[self.shards.shards[k].index])[0]
        self.tracer.complete("push shard", t0, time.time(), "push", step=a["step"], shard=k)

    def finish(self, then_pull: int | None = None) -> list[dict]:
        """After backward: send what the hooks did not, wait for every shard's reply
        (in shard order), disarm. ``then_pull``: as ``ShardClient.push``'s, a pull for
        that step sent behind the pushes before waiting (``shards.ahead`` holds it)."""
        a = self.armed
        for k in range(len(self.need)):
            if k not in a["sent"]:
                self._send(k)
        try:
            with self.tracer.span("push", "wait", step=a["step"], tasks=len(a["tasks"])):
                return self.shards.push_wait([a["sent"][k] for k in range(len(self.need))],
                                             a["step"], then_pull)
        finally:
            self.armed = None
