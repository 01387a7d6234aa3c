"""The worker's heartbeat thread (worker/heartbeat.py) against a scripted scheduler socket.

A scheduler that never answers costs the thread nothing that grows: each heartbeat not
answered in time is abandoned (no request kept for a resend, no reply kept for nobody).
One that answers FENCED sets ``fenced`` and ends the thread; one that refuses with
``run_over``, or stays silent for ``lost_after_s``, ends it too, and ``check`` raises why.
A pause that spans a heartbeat's wait does not count as the scheduler's silence.
"""
import contextlib
import time

import pytest
import zmq

from ps.wire.client import RemoteError
from ps.wire.protocol import Error, Kind, decode, encode
from worker.heartbeat import Fenced, Heartbeat, SchedulerLost

INTERVAL_S = 0.02                     # a heartbeat every 20 ms, abandoned after 40 ms


@pytest.fixture
def scheduler():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield ctx, sock, f"tcp://127.0.0.1:{port}"
    ctx.destroy(linger=0)


@contextlib.contextmanager
def running(ctx, endpoint, worker, inc):
    """A heartbeat thread for ``worker`` / ``inc``, stopped on the way out."""
    beat = Heartbeat(ctx, endpoint, worker=worker, inc=inc, interval_s=INTERVAL_S)
    beat.start()
    try:
        yield beat
    finally:
        beat.stop()


def heartbeats(sock, timeout_s):
    """Every heartbeat the socket receives within ``timeout_s``: (identity, header)."""
    got, deadline = [], time.monotonic() + timeout_s
    while sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        ident, frame = sock.recv_multipart()
        got.append((ident, decode(frame)))
    return got


@pytest.mark.timeout(30)
def test_unanswered_heartbeats_are_abandoned_not_kept(scheduler):
    ctx, sock, endpoint = scheduler
    with running(ctx, endpoint, worker=1, inc=7) as beat:
        got = heartbeats(sock, 1.5)       # dozens, each abandoned after 40 ms, none resent
        rids = {h["rid"] for _, h in got}
        assert len(rids) >= 4, got
        assert all(h["kind"] == Kind.HEARTBEAT and h["index"] == 1 and h["inc"] == 7
                   for _, h in got)
        peer = beat.peer
        # At most the one in flight now is remembered.
        assert len(peer.requests) <= 1 and len(peer.outstanding) <= 1 and len(peer.sent_at) <= 1
        assert not beat.fenced.is_set()
    assert not beat.is_alive()


@pytest.mark.timeout(30)
def test_a_fenced_answer_sets_fenced_and_ends_the_thread(scheduler):
    ctx, sock, endpoint = scheduler
    with running(ctx, endpoint, worker=0, inc=3) as beat:
        assert sock.poll(5000)
        ident, frame = sock.recv_multipart()
        sock.send_multipart([ident, encode(Kind.ERROR, decode(frame)["rid"], code=Error.FENCED,
                                           reason="worker 0 incarnation 3 was declared dead")])
        assert beat.fenced.wait(5)
        beat.join(5)
        assert not beat.is_alive()


def answer_for(sock, seconds, code=None):
    """Answer every heartbeat for ``seconds`` (OK, or an ERROR with ``code``)."""
    deadline = time.monotonic() + seconds
    while sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        ident, frame = sock.recv_multipart()
        rid = decode(frame)["rid"]
        reply = encode(Kind.OK, rid) if code is None else encode(Kind.ERROR, rid, code=code,
                                                                 reason="the run failed: x")
        sock.send_multipart([ident, reply])


@pytest.mark.timeout(30)
def test_a_scheduler_silent_for_lost_after_s_is_lost(scheduler):
    ctx, sock, endpoint = scheduler
    beat = Heartbeat(ctx, endpoint, worker=1, inc=7, interval_s=INTERVAL_S, lost_after_s=0.3)
    beat.start()
    try:
        answer_for(sock, 1.0)                  # answered: alive, however long
        assert beat.is_alive()
        beat.check()
        silent = time.monotonic()              # from now on nobody answers
        beat.join(5)
        took = time.monotonic() - silent
        assert not beat.is_alive()
        assert 0.3 <= took < 0.3 + 0.5, took   # lost_after_s, plus at most a heartbeat's wait
        with pytest.raises(SchedulerLost, match="no heartbeat answered by the scheduler"):
            beat.check()
        assert not beat.fenced.is_set()
    finally:
        beat.stop()


@pytest.mark.timeout(30)
def test_a_run_over_refusal_ends_the_thread_and_check_raises_it(scheduler):
    ctx, sock, endpoint = scheduler
    with running(ctx, endpoint, worker=2, inc=4) as beat:
        answer_for(sock, 0.5, code=Error.RUN_OVER)
        beat.join(5)
        assert not beat.is_alive()
        with pytest.raises(RemoteError) as refused:
            beat.check()
        assert refused.value.code == Error.RUN_OVER and "the run failed" in str(refused.value)
        assert not beat.fenced.is_set()


class PausedOnce:
    """A stand-in for the heartbeat's Peer: its first request spans a pause (it returns
    far later than asked, timed out, as a SIGSTOPped process's would), then every heartbeat
    is answered."""

    endpoint = "tcp://paused"

    def __init__(self, pause_s):
        self.pause_s, self.calls = pause_s, 0

    def request(self, kind, timeout_s, **fields):
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.pause_s)
            raise TimeoutError("no reply (the process was paused)")
        return {"kind": Kind.OK}, []

    def close(self):
        pass


@pytest.mark.timeout(30)
def test_a_pause_spanning_a_heartbeat_is_not_the_schedulers_silence(scheduler):
    ctx, _, endpoint = scheduler
    beat = Heartbeat(ctx, endpoint, worker=0, inc=1, interval_s=INTERVAL_S, lost_after_s=0.3)
    beat.peer.close()
    beat.peer = PausedOnce(pause_s=1.0)        # longer than lost_after_s
    beat.start()
    try:
        time.sleep(1.5)
        assert beat.peer.calls > 2 and beat.is_alive()   # the next heartbeat was answered
        beat.check()
    finally:
        beat.stop()


def test_check_raises_fenced_once_fenced(scheduler):
    ctx, _, endpoint = scheduler
    beat = Heartbeat(ctx, endpoint, worker=3, inc=9)
    try:
        beat.check()
        beat.fenced.set()
        with pytest.raises(Fenced, match="worker 3 incarnation 9 was declared dead"):
            beat.check()
    finally:
        beat.peer.close()
