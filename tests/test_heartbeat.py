"""The worker's heartbeat thread (worker/heartbeat.py) against a scripted scheduler socket.

A scheduler that never answers costs the thread nothing that grows: each heartbeat not
answered in time is abandoned (no request kept for a resend, no reply kept for nobody).
One that answers FENCED sets ``fenced`` and ends the thread.
"""
import contextlib
import time

import pytest
import zmq

from ps.wire.protocol import Error, Kind, decode, encode
from worker.heartbeat import Heartbeat

INTERVAL_S = 0.02                     # a heartbeat every 20 ms, abandoned after 200 ms


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
        got = heartbeats(sock, 1.5)       # about 6, each abandoned after 0.2 s, none resent
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
