"""The server: one shard of the parameters, served over a ZeroMQ ROUTER.

Start it with ``python -m ps.server --scheduler tcp://HOST:PORT``. It binds its data
socket, registers with the scheduler (whose reply, sent once the whole cluster has
joined, says which range of the flat parameters this shard holds, the optimizer and
the consistency mode), then serves until the scheduler tells it to stop:

    PULL  -> answered now, or parked until the consistency gate opens (with a deadline)
    PUSH  -> validated, de-duplicated, applied (or summed, in BSP), acknowledged
    INIT  -> initial values, once
    SCHEDULE -> the job's learning rate per version (lr_at), once
    STATS -> counters

Every request is validated before it touches state (``ps.wire.protocol``); a bad one gets
an ERROR reply with a reason code and is counted. The decisions live in ``ps.core.shard``,
the flags in ``ps.server.config``; this file only receives, validates, calls the core
and sends.

With clipping (a job's ``CLIP_GRAD_NORM``), a BSP step complete here is held until the
shards agree on its global norm: the server sends its part to the scheduler
(``ps.server.norm``, ``ps.scheduler.norms``) and applies the step when the total comes
back.
"""
from __future__ import annotations

import faulthandler
import logging
import signal
import time
from collections import Counter, OrderedDict

import zmq

from ps.core.shard import Shard
from ps.faults import messages
from ps.reliability import checkpoint
from ps.server.checkpoints import Checkpoints
from ps.security import curve
from ps.server.config import ServerConfig, parse_args
from ps.server.norm import NormExchange
from ps.server.sparse_tables import Tables
from ps.wire import transport, validation
from ps.wire.client import Peer, RemoteError
from ps.wire.protocol import (WAIT_LOG_S, Error, Kind, ProtocolError, check_frames, check_int_list,
                              decode, encode, optional_bool, request_header)

log = logging.getLogger("ps.server")

MAX_TASKS_PER_PUSH = 1 << 16     # a push names at most this many task ids
PUSH_REPLY_CACHE = 4096          # replies remembered by (incarnation, rid): a retried or
                                 # duplicated push gets its first answer again, not a second apply
BYE_FLUSH_S = 0.2                # how long the last heartbeat (bye) may take to leave at exit
CHECKPOINT_FINISH_S = 10.0       # at exit, how long a checkpoint still being written may take
CHECKPOINT_POLL_S = 0.05         # while one is written, how often the loop looks whether it is done


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.ctx = zmq.Context()
        self.router = transport.make_socket(self.ctx, zmq.ROUTER)
        self.auth = curve.secure_server(self.ctx, self.router)   # before bind: no gap
        self.router.bind(config.bind)
        curve.warn_if_exposed(config.bind, "server")
        self.endpoint = config.advertise or self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        if config.endpoint_file:
            transport.write_endpoint(config.endpoint_file, self.endpoint)
        self.scheduler = Peer(self.ctx, config.scheduler, "scheduler")
        self.shard: Shard | None = None
        self.index = -1
        self.inc = 0                         # our incarnation, from the scheduler
        self.checkpoints: Checkpoints | None = None   # --checkpoint-every: ps.server.checkpoints
        self.next_beat = 0.0                 # when the next heartbeat is due
        self.parked: list[tuple] = []        # pulls waiting for the gate: (deadline, ident, header)
        self.in_flight: list = []            # zmq trackers of replies sending from the shard's arrays
        self.errors: Counter = Counter()     # rejected requests by reason code
        self.copies: Counter = Counter()     # bytes copied on the hot path (copy-on-write)
        self.push_replies: OrderedDict = OrderedDict()   # (inc, rid) -> reply header
        self.registered_rid = 0              # our last re-registration (scheduler restarts)
        self.waits: dict = {}                # (worker, step) -> when its pull was first parked
        self.logged_waits: set = set()       # (worker, step) of parked pulls already logged
        self.refusals = validation.RefusalLog(log)       # bad input logged at a bounded rate
        self.norms: NormExchange | None = None           # clipping's agreement, once registered
        self.replying: dict[int, tuple] = {}             # worker -> (inc, rid, tracker) of the
                                                         # last pull answered: still leaving?
        self.tables = Tables([], 0, 0, 1)                # sparse tables: ps.server.sparse_tables
        self.out: str | None = None                      # where they are written at the end

    # -- life cycle -----------------------------------------------------------------
    def register(self) -> None:
        """Join the cluster; the scheduler answers once every role has registered."""
        reply, _ = self.scheduler.request(Kind.REGISTER, self.config.timeout_s,
                                          role="server", endpoint=self.endpoint,
                                          shard=self.config.shard)
        self.index, self.inc = reply["shard"], reply["inc"]
        self.lo, self.hi = reply["lo"], reply["hi"]
        self.shard = Shard(reply["hi"] - reply["lo"], reply["optimizer"], reply["mode"],
                           reply["staleness"], reply["workers"],
                           segments=segments(reply.get("param_groups"), self.lo, self.hi),
                           clip=reply.get("clip"), lr_versions=reply.get("lr_versions"),
                           pushes_per_round=reply.get("pushes_per_round", 1))
        if reply.get("sparse"):
            self.tables = Tables(reply["sparse"], reply["seed"], self.index, reply["servers"],
                                 reply["mode"])
            self.out = self.config.out or reply.get("out")
        if self.shard.clip is not None:
            self.norms = NormExchange(self.scheduler, self.index, self.inc, self.config.nonfinite)
        if reply.get("checkpoint_every"):
            self.checkpoints = Checkpoints(reply["checkpoint_every"], reply.get("checkpoint_dir"),
                                           self.index, self.lo, self.hi, self.errors,
                                           self.config.fail_checkpoints, self.config.crash_at)
        if reply.get("restore"):
            manifest = reply["restore"]
            params, state = checkpoint.load_range(manifest, self.lo, self.hi)
            self.shard.restore(params, state, manifest["version"])
            if self.tables:
                self.tables.restore(manifest)
            log.warning("shard %d restored from the checkpoint of version %d", self.index,
                        manifest["version"])
        log.info("shard %d: elements [%d, %d) at %s, %s", self.index, reply["lo"], reply["hi"],
                 self.endpoint, reply["mode"])

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.scheduler.sock, zmq.POLLIN)
        last_heard = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= self.next_beat:
                self.scheduler.send(Kind.HEARTBEAT, want_reply=False, role="server",
                                    index=self.index, inc=self.inc, stats=self.stats())
                self.next_beat = now + self.config.heartbeat_interval_s
            if now - last_heard > self.config.timeout_s:
                raise TimeoutError(f"scheduler silent for {self.config.timeout_s:.0f} s; giving up")
            wait_s = self.next_beat - now
            norm_s = self.norms.due(self.shard, now) if self.norms else None
            if norm_s is not None:
                wait_s = min(wait_s, norm_s)
            if self.checkpoints is not None and self.checkpoints.busy():
                wait_s = min(wait_s, CHECKPOINT_POLL_S)
            events = dict(poller.poll(timeout=max(1, int(wait_s * 1000))))
            self._collect_checkpoint()
            if self.scheduler.sock in events:
                last_heard = time.monotonic()
                if self._scheduler_reply():
                    self._collect_checkpoint(CHECKPOINT_FINISH_S)   # into the last counters
                    if self.tables and self.out:
                        self.tables.write(self.out)
                    self._say_bye()
                    return
            if self.router in events:
                for _ in range(64):          # drain a burst before the next heartbeat check
                    try:
                        frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.handle(frames)
            self._expire_parked()

    def _scheduler_reply(self) -> bool:
        """Apply what the scheduler says: a step's global norm (clipping); incarnations to
        fence; whether to stop."""
        try:
            header = decode(self.scheduler.sock.recv_multipart(copy=False)[0])
            if header["kind"] == Kind.ERROR and header.get("code") == Error.REREGISTER:
                if header["rid"] > self.registered_rid:   # not one sent before we registered again
                    self.register_again()
                    if self.norms and self.norms.resend_at is not None:
                        self.norms.resend_at = 0.0         # and our NORM again, at once
                return False
            if "norm_step" in header:
                self._on_norm(header)
                return False
            if header["kind"] == Kind.ERROR and self.norms and header["rid"] in self.norms.rids:
                log.warning("the scheduler refused our norm: %s; sending it again", header["reason"])
                return False
            if header["kind"] == Kind.ERROR:
                raise RuntimeError(f"the scheduler refused our heartbeat: {header['reason']}")
            fenced = header.get("fenced", [])
            for worker, inc in fenced:
                if inc not in self.shard.fenced:
                    log.warning("fencing worker %d incarnation %d", worker, inc)
                    self.shard.fence(worker, inc)
        except (ProtocolError, TypeError, ValueError) as exc:
            log.warning("bad heartbeat reply from the scheduler: %s", exc)
            return False
        if fenced:
            self._answer_parked()       # an SSP gate may open now that a clock left the minimum
        return bool(header.get("stop"))

    def _say_bye(self) -> None:
        """Tell the scheduler we heard its stop, so it need not linger to repeat it; given
        BYE_FLUSH_S to leave before the socket closes. Lost, it costs the scheduler its
        linger, nothing else."""
        self.scheduler.send(Kind.HEARTBEAT, want_reply=False, role="server", index=self.index,
                            inc=self.inc, stats=self.stats(), bye=True)
        self.scheduler.sock.close(linger=int(BYE_FLUSH_S * 1000))

    def register_again(self) -> None:
        """The scheduler restarted (it answered REREGISTER): register again as the same
        shard and incarnation, with our counters (it learns our version at once)."""
        rid = self.scheduler.send(Kind.REGISTER, role="server", index=self.index, inc=self.inc,
                                  endpoint=self.endpoint, stats=self.stats())
        self.registered_rid = rid
        reply, _ = self.scheduler.recv(rid, self.config.timeout_s, "register again")
        for worker, inc in reply.get("fenced", []):
            self.shard.fence(worker, inc)
        log.warning("shard %d registered again with a restarted scheduler", self.index)

    # -- requests -------------------------------------------------------------------
    def handle(self, frames: list) -> None:
        ident, rid = frames[0].bytes, 0
        try:
            header = request_header(frames)
            rid = header["rid"]
            check_frames(header["kind"], frames[2:])
            curve.check_sender(frames[1], header)
            handler = {Kind.PULL: self.on_pull, Kind.PUSH: self.on_push,
                       Kind.INIT: self.on_init, Kind.STATS: self.on_stats,
                       Kind.SCHEDULE: self.on_schedule, Kind.SPARSE_PULL: self.on_sparse_pull,
                       Kind.SPARSE_PUSH: self.on_sparse_push}.get(header["kind"])
            if handler is None:
                raise ProtocolError(Error.UNKNOWN_KIND, f"a server does not serve {header['kind']!r}")
            handler(ident, header, frames[2:])
        except ProtocolError as exc:
            self.errors[exc.code] += 1
            self.refusals.note(exc)
            self.reply(ident, encode(Kind.ERROR, rid, code=exc.code, reason=exc.reason))
        except Exception as exc:   # a bug, not bad input: report it, count it, keep serving
            log.exception("internal error handling a request")
            self.errors[Error.INTERNAL] += 1
            self.reply(ident, encode(Kind.ERROR, rid, code=Error.INTERNAL, reason=repr(exc)))

    def on_init(self, ident, header, payload) -> None:
        self._check_worker(header)
        validation.check_range(header, self.lo, self.hi)
        self.shard.check_live(header["inc"])
        chunks = transport.check_payload(payload, header["dtype"], header["size"], ("float32",))
        fresh = self.shard.init(chunks)
        self.reply(ident, encode(Kind.OK, header["rid"], fresh=fresh))
        self._answer_parked()

    def on_sparse_pull(self, ident, header, payload) -> None:
        self._check_worker(header)
        self.shard.check_live(header["inc"])
        fields, frames = self.tables.pull(header, payload)
        self.reply(ident, encode(Kind.OK, header["rid"], **fields), frames)

    def on_sparse_push(self, ident, header, payload) -> None:
        self._check_worker(header)
        self.shard.check_live(header["inc"])
        if self._answered_before(ident, header):
            return
        self._answer_push(ident, header, encode(Kind.OK, header["rid"],
                                                applied=self.tables.push(header, payload)))

    def _answered_before(self, ident, header) -> bool:
        """A push (dense or sparse) seen before, by (incarnation, rid): a retry, or a copy
        duplicated on the wire. It gets its first answer again and is not applied."""
        answer = self.push_replies.get((header["inc"], header["rid"]))
        if answer is not None:
            self.reply(ident, answer)
        return answer is not None

    def _answer_push(self, ident, header, answer: bytes) -> None:
        """Reply to a push, remembering the answer for its retries (the newest
        PUSH_REPLY_CACHE)."""
        self.push_replies[(header["inc"], header["rid"])] = answer
        if len(self.push_replies) > PUSH_REPLY_CACHE:
            self.push_replies.popitem(last=False)
        self.reply(ident, answer)

    def on_schedule(self, ident, header, payload) -> None:
        self._check_worker(header)
        self.shard.check_live(header["inc"])
        fresh = self.shard.set_schedule(validation.lr_table(payload, header["versions"]))
        self.reply(ident, encode(Kind.OK, header["rid"], fresh=fresh))

    def on_pull(self, ident, header, payload) -> None:
        self._check_worker(header)
        validation.check_pull(header)
        self.shard.check_live(header["inc"])
        last = self.replying.get(header["worker"])
        if last and last[:2] == (header["inc"], header["rid"]) and not last[2].done:
            # A Lazy Pirate resend of a pull whose answer is still leaving (zmq's tracker):
            # not lost, only slow. Answering again would queue the shard a second time
            # behind it: on a slow link (4 MB at 20 Mbit/s: 1.6 s) the resends, every
            # 0.25 s, would fill it faster than it drains.
            self.copies["pull_resends_ignored"] += 1
            return
        if self.shard.pull_ready(header["step"]):
            self._answer_pull(ident, header)
        else:
            # A worker waits on one pull at a time: a newer one replaces any it gave up
            # on (its client timed out and asked again), so the gate opening later sends
            # the parameters once, not once per retry.
            self.parked = [p for p in self.parked if p[2]["worker"] != header["worker"]]
            self.parked.append((time.monotonic() + self.config.timeout_s, ident, header))

    def on_push(self, ident, header, payload) -> None:
        self._check_worker(header)
        validation.check_range(header, self.lo, self.hi)
        tasks = check_int_list(header, "tasks", MAX_TASKS_PER_PUSH)
        if header["step"] < 0 or header["step_tasks"] < 1:
            raise ProtocolError(Error.BAD_FIELD, "step must be >= 0 and step_tasks >= 1")
        validation.check_window(header["step"], self.shard.clocks, self.shard.mode,
                                self.shard.staleness)
        chunks = transport.check_payload(payload, header["dtype"], header["size"])
        if self._answered_before(ident, header):
            return
        self.shard.check_live(header["inc"])     # fenced: refused before a scan of its bytes
        if header["samples"] > 0:
            chunks = validation.screen_gradient(chunks, self.shard.size, self.config.nonfinite,
                                                self.errors)
        self._release_params()
        ends_clock = optional_bool(header, "ends_clock", True)
        last = optional_bool(header, "last", False)
        version = self.shard.version
        applied = self.shard.push(header["worker"], header["step"], tasks, header["samples"],
                                  header["step_tasks"], chunks, header["inc"], ends_clock, last)
        self._stepped(version)
        if self.norms:
            self.norms.start(self.shard)  # a step complete here: agree on its norm
        self._answer_push(ident, header, encode(Kind.OK, header["rid"], applied=applied,
                                                version=self.shard.version))
        self._answer_parked()

    def _stepped(self, version: int) -> None:
        """After an update may have happened (the shard was at ``version``): a BSP
        checkpoint when one is due."""
        if self.checkpoints is not None:
            self.checkpoints.after_update(self.shard, version, self.tables or None)

    def _on_norm(self, header) -> None:
        """The held step's global norm (``ps.server.norm``): apply the step, clipped."""
        held = self.norms.answer(header, self.shard) if self.norms else None
        if held is None:
            return                        # a repeat of an answer already applied
        self._release_params()
        version = self.shard.version
        self.shard.finish_step(*held)
        if held[2]:
            self.errors["nonfinite_skipped"] += 1
        self._stepped(version)
        self._answer_parked()

    def on_stats(self, ident, header, payload) -> None:
        self.reply(ident, encode(Kind.OK, header["rid"], shard=self.index, **self.stats()))

    # -- helpers --------------------------------------------------------------------
    def _check_worker(self, header) -> None:
        if "worker" not in header or not 0 <= header["worker"] < len(self.shard.clocks):
            raise ProtocolError(Error.UNKNOWN_SENDER, f"unknown worker {header.get('worker')!r}")

    def _answer_pull(self, ident, header) -> None:
        try:
            params, version = self.shard.params_for(header["step"])
        except ProtocolError as exc:
            self.errors[exc.code] += 1
            self.reply(ident, encode(Kind.ERROR, header["rid"], code=exc.code, reason=exc.reason))
            return
        stale, dtype = self.shard.note_read(header["step"]), header.get("dtype", "float32")
        head = encode(Kind.OK, header["rid"], version=version, staleness=stale,
                      dtype=dtype, size=self.shard.size)
        # float32: zero-copy from the parameter buffer, which must not change until zmq's I/O
        # thread has sent it (_release_params). float16/bfloat16: a fresh encoded buffer.
        frames, live = transport.pull_frames(params, dtype)
        tracker = self.reply(ident, head, frames, track=True)
        if tracker is not None:
            self.replying[header["worker"]] = (header["inc"], header["rid"], tracker)
        if live and tracker is not None and not tracker.done:
            self.in_flight.append(tracker)

    def _release_params(self) -> None:
        """Copy-on-write: if a reply still references the params, update a fresh copy.

        Waiting for zmq would stall the loop behind a slow reader; copying only when
        a send is really still in flight costs nothing in the common case (the
        tracker is done long before the next push arrives).
        """
        self.in_flight = [t for t in self.in_flight if not t.done]
        if self.in_flight:               # params, and (BSP) the previous version in grad
            self.copies["cow_bytes"] += self.shard.unshare()
            self.in_flight.clear()

    def _answer_parked(self) -> None:
        still = []
        for deadline, ident, header in self.parked:
            if self.shard.pull_ready(header["step"]):
                self._answer_pull(ident, header)
            else:
                still.append((deadline, ident, header))
        self.parked = still

    def _expire_parked(self) -> None:
        now = time.monotonic()
        for deadline, ident, header in self.parked:     # no silent waits (ps.scheduler.diagnose)
            key = (header["worker"], header["step"])      # the worker asks again every POLL_S
            since = self.waits.setdefault(key, now)
            if now - since > WAIT_LOG_S and key not in self.logged_waits:
                self.logged_waits.add(key)
                log.warning("shard %d: pull of step %d by worker %d parked for %.1f s: %s", self.index,
                            header["step"], header["worker"], now - since, self.shard.waiting(header["step"]))
        for deadline, ident, header in [p for p in self.parked if p[0] <= now]:
            self.errors[Error.TIMEOUT] += 1
            self.reply(ident, encode(Kind.ERROR, header["rid"], code=Error.TIMEOUT,
                                     reason=f"step {header['step']} not readable: clocks "
                                            f"{self.shard.clocks}, version {self.shard.version}"))
        self.parked = [p for p in self.parked if p[0] > now]
        parked = {(h["worker"], h["step"]) for _, _, h in self.parked}   # forget answered waits
        self.waits = {k: t for k, t in self.waits.items() if k in parked}
        self.logged_waits &= parked

    def reply(self, ident, head: bytes, payload=(), track: bool = False):
        try:
            return self.router.send_multipart([ident, head, *payload], copy=False, track=track)
        except zmq.ZMQError as exc:      # ROUTER_MANDATORY: the peer is gone; nothing to do
            log.warning("reply to a vanished peer dropped: %s", exc)
            return None

    def _collect_checkpoint(self, wait_s: float = 0.0) -> None:
        """A finished checkpoint write: report it at the next heartbeat, which goes out now
        (the scheduler commits the manifest once every shard has)."""
        if self.checkpoints is not None and self.checkpoints.collect(wait_s):
            self.next_beat = 0.0

    def stats(self) -> dict:
        stats = self.shard.stats() if self.shard else {}
        stats["errors"], stats["copies"] = dict(self.errors), dict(self.copies)
        stats["checkpoint"] = self.checkpoints.last if self.checkpoints else None
        if self.norms is not None:
            stats["norm_hold"] = self.norms.stats()
        if self.tables:
            stats["sparse"] = self.tables.stats()
        stats.update(messages.fields())          # --inject drop/dup/delay: what fired
        return stats

    def close(self) -> None:
        self.scheduler.close()
        self.router.close(linger=0)
        curve.stop(self.auth)
        self.ctx.term()


def segments(groups: list | None, lo: int, hi: int) -> list | None:
    """The job's parameter groups (``[[glo, ghi, overrides], ...]`` over the flat vector)
    cut at this shard's bounds: ``[[start, end, overrides], ...]`` over ``[0, hi - lo)``."""
    if not groups:
        return None
    return [[max(glo, lo) - lo, min(ghi, hi) - lo, overrides]
            for glo, ghi, overrides in groups if glo < hi and ghi > lo]


def main(argv=None) -> int:
    config = parse_args(argv)
    messages.install_from_env(f"server{config.shard}" if config.shard >= 0 else "server")
    if config.secure:
        curve.use(curve.Keyring(config.secure, f"server{config.shard}"))
    server = Server(config)
    faulthandler.register(signal.SIGUSR1)   # `kill -USR1 PID` prints every thread's stack
    try:
        server.register()
        server.serve()
        return 0
    except (TimeoutError, ProtocolError, RemoteError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        server.close()
