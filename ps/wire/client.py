"""Request/reply clients: one for the scheduler, one for all shards (numpy only).

``Peer`` is a DEALER socket to one ROUTER: every request carries a request id
(``rid``) and every wait has a deadline; a reply whose rid we are no longer waiting
for (a late answer to a request that timed out) is dropped, never mistaken for the
current one. ``ShardClient`` speaks to all S servers at once: it sends to every
shard before waiting on any, so the S transfers overlap instead of queueing.

Workers wrap these with torch (``worker/``); the launcher and benchmarks use them
directly on numpy arrays.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import zmq

from ps.core import compress
from ps.security import curve
from ps.wire import transport
from ps.wire.protocol import Error, Kind, ProtocolError, decode, encode

RETRY_INTERVAL_S = 0.25   # a request unanswered this long is sent again (same rid) ...
RETRY_BYTES_PER_S = 2e8   # ... plus the time its payload takes at a pessimistic 200 MB/s,
                          # so a large push is not sent twice just for being large; and a
                          # request with payload is never resent while its last copy is still
                          # leaving (zmq's MessageTracker): on a slow link (a 4 MB push at 20
                          # Mbit/s takes 1.6 s) resends would queue faster than the link drains


class NoReply(TimeoutError):
    """A request's deadline passed without a reply (a TimeoutError: callers that wait on
    anything catch that; the worker's job guard tells this one from the job's own)."""


class RemoteError(RuntimeError):
    """The peer answered with an ERROR reply."""

    def __init__(self, peer: str, code: str, reason: str):
        super().__init__(f"{peer} refused: {code}: {reason}")
        self.code = code
        self.reason = reason


class Peer:
    """A DEALER connected to one endpoint, with request ids and deadlines.

    Several requests may be in flight at once (a worker leases its next task while
    computing the current one). Replies are matched by rid: one that arrives while
    we wait for another outstanding request is kept for later; one nobody waits
    for any more (``abandon``-ed, or sent with ``want_reply=False``) is dropped. A
    ``recv`` that times out leaves its request outstanding, so the caller may wait
    again for the same reply.

    ``register_again``, when set, is called when the scheduler answers ``reregister`` (it was
    restarted and does not know us yet): it registers again, and the refused request
    is sent again with the same rid, so the caller never sees the restart.

    ``check``, when set, is called at least every retry interval while a reply is awaited;
    it raises to end the wait early (a worker's: its heartbeat learnt that it was fenced,
    that the run failed, or that the scheduler is gone), so no wait outlasts that news.
    """

    _rids = itertools.count(1)

    def __init__(self, ctx: zmq.Context, endpoint: str, name: str):
        self.endpoint, self.name = endpoint, name
        self.sock = transport.make_socket(ctx, zmq.DEALER)
        curve.secure_client(self.sock, name)     # --secure: CurveZMQ to the key named `name`
        self.sock.connect(endpoint)
        self.outstanding: set[int] = set()              # rids whose replies we still want
        self.arrived: dict[int, tuple[dict, list]] = {}  # replies that came while we waited for others
        self.requests: dict[int, list] = {}              # rid -> the frames sent, to resend
        self.sent_at: dict[int, float] = {}              # rid -> when it was last sent
        self.leaving: dict[int, zmq.MessageTracker] = {}  # rid -> its last copy's tracker
                                                          # (requests with payload frames)
        self.register_again = None                       # () -> None: register again (see above)
        self.check = None                                # () -> None: raises to end a wait (above)
        self.reregistered_at = 0.0

    def send(self, kind: str, frames=(), want_reply: bool = True, **fields) -> int:
        rid = next(self._rids)
        message = [encode(kind, rid, **fields), *frames]
        tracker = self.sock.send_multipart(message, copy=False, track=bool(frames) and want_reply)
        if want_reply:
            if frames:
                self.leaving[rid] = tracker
            self.outstanding.add(rid)
            self.requests[rid] = message        # kept for a Lazy Pirate resend
            self.sent_at[rid] = time.monotonic()
        return rid

    def _on_reregister(self, rid: int) -> None:
        """``rid`` was refused with REREGISTER: register again, then send it again, same
        rid. Copies of a request queued while the scheduler was down are all refused; a
        refusal of one sent before our last registration, or within a retry interval of
        it, is such a copy: it is only sent again."""
        now = time.monotonic()
        since = self.reregistered_at
        if self.sent_at.get(rid, 0.0) >= since and now - since > RETRY_INTERVAL_S:
            self.register_again()
            self.reregistered_at = time.monotonic()
        if rid in self.requests:
            self._resend(rid)

    def _resend(self, rid: int) -> None:
        tracker = self.sock.send_multipart(self.requests[rid], copy=False, track=rid in self.leaving)
        if rid in self.leaving:
            self.leaving[rid] = tracker
        self.sent_at[rid] = time.monotonic()

    def recv(self, rid: int, timeout_s: float, what: str = "") -> tuple[dict, list]:
        """Wait for the reply to ``rid``; raise TimeoutError naming what we waited for."""
        deadline = time.monotonic() + timeout_s
        interval = RETRY_INTERVAL_S + sum(
            memoryview(f).nbytes for f in self.requests.get(rid, ())) / RETRY_BYTES_PER_S
        resend_at = time.monotonic() + interval
        while rid not in self.arrived:
            if self.check is not None:
                self.check()
            now = time.monotonic()
            if now >= resend_at and rid in self.requests:
                # Lazy Pirate: the request or its reply may be lost; ask again with the
                # same rid (handlers are idempotent by rid, so a repeat is harmless).
                # Not while its last copy is still leaving: that one is not lost, only slow.
                if self.leaving.get(rid) is None or self.leaving[rid].done:
                    self._resend(rid)
                resend_at = now + interval
            left_ms = int(max(0.0, min(deadline, resend_at) - now) * 1000)
            if not self.sock.poll(left_ms) and time.monotonic() >= deadline:
                raise NoReply(f"no reply from {self.name} ({self.endpoint}) "
                                   f"to {what or 'request'} within {timeout_s:.0f} s")
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            try:
                header = decode(frames[0])
            except ProtocolError:
                continue        # garbage from the wire is dropped, not trusted
            if header["rid"] in self.outstanding:
                if (self.register_again is not None and header["kind"] == Kind.ERROR
                        and header.get("code") == Error.REREGISTER):
                    self._on_reregister(header["rid"])
                    continue
                self.arrived[header["rid"]] = (header, frames[1:])
            # else: a late reply to an abandoned request, or one nobody asked for
        self.outstanding.discard(rid)
        self.requests.pop(rid, None)
        self.sent_at.pop(rid, None)
        self.leaving.pop(rid, None)
        header, frames = self.arrived.pop(rid)
        if header["kind"] == Kind.ERROR:
            raise RemoteError(self.name, header["code"], header["reason"])
        return header, frames

    def request(self, kind: str, timeout_s: float, frames=(), **fields) -> tuple[dict, list]:
        rid = self.send(kind, frames, **fields)
        try:
            return self.recv(rid, timeout_s, what=kind)
        except TimeoutError:
            self.abandon(rid)
            raise

    def abandon(self, rid: int) -> None:
        """Stop waiting for ``rid``: a reply that still comes is dropped, not kept."""
        self.outstanding.discard(rid)
        self.requests.pop(rid, None)
        self.sent_at.pop(rid, None)
        self.leaving.pop(rid, None)
        self.arrived.pop(rid, None)

    def keep(self, rid: int, reply: tuple[dict, list]) -> None:
        """Put back a reply ``recv`` returned, unused: the next ``recv(rid)`` returns it."""
        self.outstanding.add(rid)
        self.arrived[rid] = reply

    def close(self) -> None:
        self.sock.close(linger=0)


@dataclass(frozen=True)
class ShardInfo:
    """Where shard k lives and which range [lo, hi) of the flat parameters it holds."""
    index: int
    endpoint: str
    lo: int
    hi: int


class ShardClient:
    """Pull and push a flat float32 parameter vector to/from all shards.

    ``grad_dtype`` and ``param_dtype`` choose what travels (``ps.core.compress``): pushes are
    encoded per shard before sending, pulls ask the server for their dtype and are
    decoded straight into the flat float32 buffer. float32 (the default) is exact and
    copies nothing on the way out.
    """

    def __init__(self, ctx: zmq.Context, shards: list[ShardInfo], worker: int, timeout_s: float,
                 incarnation: int = 0, grad_dtype: str = "float32", param_dtype: str = "float32"):
        for dtype in (grad_dtype, param_dtype):
            if dtype not in compress.WIRE_DTYPES:
                raise ValueError(f"wire dtype {dtype!r} not in {compress.WIRE_DTYPES}")
        self.shards = shards
        self.worker = worker
        self.inc = incarnation          # our fencing number, given at registration
        self.timeout_s = timeout_s
        self.grad_dtype, self.param_dtype = grad_dtype, param_dtype
        self.peers = [Peer(ctx, s.endpoint, f"server{s.index}") for s in shards]
        self.pulled_bytes = 0           # bytes written into the flat buffer by pulls (one copy each)
        self.wire_pulled = 0            # payload bytes received in pull replies, as sent (any dtype)
        self.wire_pushed = 0            # payload bytes of pushes sent (a Lazy Pirate resend not counted)
        self.ahead: tuple[int, list[int]] | None = None   # the last pull sent by push(then_pull=)

    def init(self, flat: np.ndarray) -> None:
        """Set every shard's initial values (idempotent on the server)."""
        rids = [p.send(Kind.INIT, transport.split(flat[s.lo:s.hi]), worker=self.worker,
                       inc=self.inc, lo=s.lo, dtype="float32", size=s.hi - s.lo)
                for p, s in zip(self.peers, self.shards)]
        for p, rid in zip(self.peers, rids):
            p.recv(rid, self.timeout_s, "init")

    def schedule(self, rates: np.ndarray) -> None:
        """Send every shard the job's learning rate of each version ((n,) float64, the
        job's ``lr_at``); idempotent on the server, like INIT."""
        rates = np.ascontiguousarray(rates, dtype="<f8")
        rids = [p.send(Kind.SCHEDULE, transport.split(rates), worker=self.worker, inc=self.inc,
                       versions=rates.size) for p in self.peers]
        for p, rid in zip(self.peers, rids):
            p.recv(rid, self.timeout_s, "schedule")

    def pull_send(self, step: int) -> tuple[int, list[int]]:
        """Send a pull to every shard and return at once: ``(step, rids)`` for
        ``pull_into(..., pending=)``. The replies are received by zmq's I/O thread in
        the background and wait in the socket, as frames, until asked for."""
        return step, [p.send(Kind.PULL, worker=self.worker, inc=self.inc, step=step,
                             dtype=self.param_dtype) for p in self.peers]

    def abandon(self, pending: tuple[int, list[int]]) -> None:
        for p, rid in zip(self.peers, pending[1]):
            p.abandon(rid)

    def pull_into(self, flat: np.ndarray, step: int, timeout_s: float | None = None,
                  pending: tuple[int, list[int]] | None = None,
                  keep_on_timeout: bool = False) -> list[int]:
        """Fill ``flat`` with the shards' parameters for ``step``; return their versions.

        Each server answers once its consistency gate allows (BSP: it has version
        ``step``; SSP: every worker is within the staleness bound; ASP: at once).
        All or nothing: ``flat`` is written only once every shard has answered, so a
        timed-out pull never leaves a mix of versions in the model (nor does a
        prefetch: ``pending``, a ``pull_send`` of this step, is waited for here).
        ``keep_on_timeout``: a TimeoutError leaves ``pending``'s requests outstanding, for
        the caller to wait on again (a reply still on its way is not asked for twice).
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        step, rids = pending if pending is not None else self.pull_send(step)
        replies = []
        try:
            for p, rid in zip(self.peers, rids):
                replies.append(p.recv(rid, timeout_s, f"pull of step {step}"))
        except TimeoutError:
            if not keep_on_timeout:
                self.abandon((step, rids))
                raise
            for p, rid, reply in zip(self.peers, rids, replies):
                p.keep(rid, reply)            # received, unused: there for the next wait
            raise
        except BaseException:                 # an error reply: the other shards'
            self.abandon((step, rids))        # replies are not kept for nobody
            raise
        chunks = [transport.check_payload(frames, header.get("dtype", ""), s.hi - s.lo)
                  for (header, frames), s in zip(replies, self.shards)]
        self.wire_pulled += sum(c.nbytes for shard_chunks in chunks for c in shard_chunks)
        for shard_chunks, s in zip(chunks, self.shards):
            # The one unavoidable copy: frame -> model storage (decoding float16/bfloat16
            # to float32 in the same pass).
            transport.copy_into(flat[s.lo:s.hi], shard_chunks)
            self.pulled_bytes += (s.hi - s.lo) * flat.itemsize
        return [header.get("version", -1) for header, _ in replies]

    def push(self, grad: np.ndarray, step: int, tasks: list[int], samples: int,
             step_tasks: int, ends_clock: bool = True, only: list[int] | None = None,
             then_pull: int | None = None, last: bool = False) -> list[dict]:
        """Send each shard its slice of a gradient sum; return each shard's reply.

        ``then_pull``: also send a pull for that step right behind the pushes, before
        waiting for their replies (a prefetch: ``self.ahead`` holds it for
        ``pull_into(..., pending=)``). A server takes a connection's messages in order,
        so the pull is answered after the push is applied (or, in BSP, summed).

        A shard that rejects the push as a duplicate answers OK with ``applied``
        False: the gradient is already in, which is what the sender wanted. ``last``: the
        sender will push no further round of its own (async DiLoCo), so its clock gates
        nobody from now on.
        """
        sent = self.push_send(grad, step, tasks, samples, step_tasks, ends_clock, only, last)
        return self.push_wait(sent, step, then_pull)

    def push_send(self, grad: np.ndarray, step: int, tasks: list[int], samples: int,
                  step_tasks: int, ends_clock: bool = True,
                  only: list[int] | None = None, last: bool = False) -> list[tuple[Peer, int]]:
        """Send the push to the shards in ``only`` (all: None) and return at once, with
        ``(peer, rid)`` per shard for ``push_wait`` (a worker pushing from backward hooks
        sends each shard as soon as its slice is complete)."""
        sent = []
        for p, s in zip(self.peers, self.shards):
            if only is not None and s.index not in only:     # a fault hook's partial push
                continue
            # float32: views of the gradient buffer; float16/bfloat16: a fresh half-size
            # encoding of this shard's slice, which the message keeps alive until sent
            frames = transport.split(compress.encode(grad[s.lo:s.hi], self.grad_dtype)) if samples else []
            self.wire_pushed += sum(memoryview(f).nbytes for f in frames)
            sent.append((p, p.send(Kind.PUSH, frames, worker=self.worker, inc=self.inc, step=step,
                                   tasks=tasks, samples=samples, step_tasks=step_tasks,
                                   ends_clock=ends_clock, lo=s.lo, dtype=self.grad_dtype,
                                   **({"last": True} if last else {}),
                                   size=(s.hi - s.lo) if samples else 0)))
        return sent

    def push_wait(self, sent: list[tuple[Peer, int]], step: int,
                  then_pull: int | None = None) -> list[dict]:
        """Each shard's reply to a ``push_send``, after sending ``then_pull``'s pull (as
        ``push``'s) behind it."""
        if then_pull is not None:
            self.ahead = self.pull_send(then_pull)
        try:
            return [p.recv(rid, self.timeout_s, f"push of step {step}")[0] for p, rid in sent]
        except BaseException:
            if then_pull is not None:           # nobody will take the prefetch now: its
                self.abandon(self.ahead)        # reply is dropped when it comes, not kept
                self.ahead = None
            raise

    def stats(self, timeout_s: float | None = None) -> dict[int, dict]:
        """Every shard's counters by index, asked of all shards before waiting on any;
        a shard that does not answer within ``timeout_s`` gets ``{"error": why}``."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        rids = [p.send(Kind.STATS) for p in self.peers]
        deadline = time.monotonic() + timeout_s
        stats = {}
        for info, p, rid in zip(self.shards, self.peers, rids):
            try:
                stats[info.index] = p.recv(rid, max(0.0, deadline - time.monotonic()), "stats")[0]
            except (TimeoutError, RemoteError) as exc:
                p.abandon(rid)
                stats[info.index] = {"error": str(exc)}
        return stats

    def close(self) -> None:
        for p in self.peers:
            p.close()

