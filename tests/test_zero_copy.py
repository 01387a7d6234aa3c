"""Copies on the hot path, counted: where the bytes of a push and a pull are copied.

The claim (docs/protocol.md): a float32 tensor leaves a process as views of the
array it lives in, enters as views of the received zmq frames, and is copied at most
once on each side: a server sums a push into its aggregation buffer (or, for a push that
completes its step alone, updates straight from its frames: tests/test_shard.py), a
worker copies a pull into its flat parameter buffer. Each piece is checked where it
happens:

* ``transport.split`` returns views of the source array;
* ``transport.check_payload`` returns arrays over the received frames' own memory;
* a real server (``inproc``) answers a float32 pull from the shard's live buffer,
  counts no copy-on-write in a quiet exchange, and counts one when an update meets
  a reply still in flight;
* a worker's pull writes the model's buffer exactly once (``pulled_bytes``) and
  allocates nothing of the payload's size (tracemalloc sees every numpy allocation);
  so does a server handling a float32 push.
"""
import tracemalloc

import numpy as np
import pytest

from inproc import InProcessServer

from ps.wire import transport

N = 1 << 20                        # 4 MiB of float32: one frame
SMALL = 512 << 10                  # "nothing of the payload's size": under 1/8 of it allocated
                                   # (msgpack.packb's 256 KiB packing buffer is the largest
                                   # allocation a server meets on the way; it is per message)


def address(a) -> int:
    return np.frombuffer(a, dtype=np.uint8).ctypes.data if not isinstance(a, np.ndarray) \
        else a.ctypes.data


@pytest.fixture
def live():
    srv = InProcessServer(N)
    srv.init(np.arange(N, dtype=np.float32))
    yield srv
    srv.close()


def test_split_returns_views_of_the_source():
    flat = np.arange(3 * N, dtype=np.float32)
    views = transport.split(flat, frame_bytes=N)
    assert len(views) == 12
    assert all(np.shares_memory(np.asarray(v), flat) for v in views)
    assert address(views[5]) == flat.ctypes.data + 5 * N


@pytest.mark.timeout(30)
def test_payload_arrays_are_the_received_frames_memory(live):
    grad = np.ones(N, dtype=np.float32)
    rid = live.client.peers[0].send("push", transport.split(grad), worker=0, inc=7, step=0, tasks=[0],
                                    samples=1, step_tasks=1, lo=0, dtype="float32", size=N)
    frames = live.serve_one()
    chunks = transport.check_payload(frames[2:], "float32", N)
    for chunk, frame in zip(chunks, frames[2:]):
        assert chunk.base is not None and chunk.base.obj is frame     # a view of the zmq.Frame
        assert chunk.ctypes.data == address(frame.buffer)             # at the frame's own address
    live.client.peers[0].recv(rid, 5.0)


@pytest.mark.timeout(30)
def test_float32_pull_is_sent_from_the_live_buffer_and_copied_once(live, monkeypatch):
    sent = []
    reply = live.server.reply
    monkeypatch.setattr(live.server, "reply", lambda ident, head, payload=(), track=False:
                        sent.append((list(payload), track)) or reply(ident, head, payload, track))
    flat = np.zeros(N, dtype=np.float32)
    pending = live.client.pull_send(0)
    live.serve_one()
    (payload, tracked), = sent
    assert tracked and all(np.shares_memory(np.asarray(f), live.server.shard.params) for f in payload)
    tracemalloc.start()
    try:
        live.client.pull_into(flat, 0, pending=pending)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < SMALL, f"a pull allocated {peak} bytes"
    assert live.client.pulled_bytes == flat.nbytes                    # one copy, into the model
    np.testing.assert_array_equal(flat, np.arange(N, dtype=np.float32))
    assert live.server.stats()["copies"].get("cow_bytes", 0) == 0


@pytest.mark.timeout(30)
def test_server_push_allocates_nothing_of_the_payload_size(live):
    grad = np.ones(N, dtype=np.float32)
    for step in range(2):                         # the second push meets warm caches
        rid = live.client.peers[0].send("push", transport.split(grad), worker=0, inc=7, step=step,
                                        tasks=[step], samples=1, step_tasks=1, lo=0,
                                        dtype="float32", size=N)
        tracemalloc.start()
        try:
            live.serve_one()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert live.client.peers[0].recv(rid, 5.0)[0]["applied"]
    assert peak < SMALL, f"handling a push allocated {peak} bytes"
    stats = live.server.stats()
    assert stats["version"] == 2
    assert stats["copies"] == {}                     # no copy-on-write


@pytest.mark.timeout(30)
def test_copy_on_write_is_counted_when_an_update_meets_a_reply_in_flight(live):
    class InFlight:            # a tracker zmq has not finished with (a slow reader)
        done = False
    live.server.in_flight.append(InFlight())
    before = live.server.shard.params
    rid = live.client.peers[0].send("push", transport.split(np.ones(N, dtype=np.float32)), worker=0,
                                    inc=7, step=0, tasks=[0], samples=1, step_tasks=1, lo=0,
                                    dtype="float32", size=N)
    live.serve_one()
    live.client.peers[0].recv(rid, 5.0)
    assert live.server.shard.params is not before           # the update went to a fresh copy
    np.testing.assert_array_equal(before, np.arange(N, dtype=np.float32))   # the sent bytes kept
    cow = live.server.stats()["copies"]["cow_bytes"]
    assert cow == N * 4          # the parameters (at step 0 no previous version is kept yet)
