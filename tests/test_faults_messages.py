"""Lost, duplicated and delayed messages: retried by id, applied once, BSP stays exact.

Every role's sockets drop 2% of what they send, duplicate 2% and delay all of it
(``--inject drop:0.02 --inject dup:0.02 --inject delay:1ms``, seeded). Requests are
resent with the same id (Lazy Pirate) and every handler answers a repeat with its
first answer, so: the BSP run ends with the oracle's parameters, every epoch's
samples are applied exactly once, and no duplicate push is applied. Each run also
shows, in summary.json's ``net_faults``, that every role's sockets delayed what they
sent and that messages were really dropped and duplicated.

The wrapper itself (``ps.faults.messages.FaultySocket``) is tested in-process below:
installed only where asked, seeded by run and role, and a duplicate of a tracked
send is tracked too.
"""
import itertools
import os
import time

import pytest
import zmq

from cluster import JOBS, assert_params_close, launch, oracle
from live import BareScheduler

from ps.faults import messages
from ps.wire import transport
from ps.wire.protocol import Kind
from ps.scheduler.finishing import DONE_GRACE_S

JOB = os.path.join(JOBS, "tiny_mlp.py")
STEPS = 60
NOISY = ["--inject", "drop:0.02", "--inject", "dup:0.02", "--inject", "delay:1ms"]


def assert_faults_fired(summary: dict, servers: int, workers: int) -> None:
    """Every role had the faults installed (each delayed what it sent), and messages
    were dropped and duplicated: PS_NET_FAULTS reached every role and did something."""
    net = summary["net_faults"]
    roles = ["scheduler", *(f"server{k}" for k in range(servers)),
             *(f"worker{w}" for w in range(workers))]
    assert sorted(net) == sorted(roles), net
    assert all(net[role]["delayed"] > 0 for role in roles), net
    assert sum(c["dropped"] for c in net.values()) > 0, net
    assert sum(c["duplicated"] for c in net.values()) > 0, net


@pytest.mark.slow
def test_bsp_with_lost_duplicated_and_delayed_messages_equals_the_oracle(tmp_path):
    run = launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "2", "--steps", str(STEPS),
                 "--tasks-per-step", "6", *NOISY, timeout_s=150)
    assert run.rc == 0, run.stderr[-4000:]
    summary = run.summary
    assert [e["samples_applied"] for e in summary["per_epoch"]] == [200] * 6 + [6 * 24]
    assert summary["deaths"] == []
    assert_faults_fired(summary, servers=2, workers=3)
    assert_params_close(run.params, oracle(JOB, STEPS), rtol=1e-5)


@pytest.mark.parametrize("mode", ["ssp", pytest.param("asp", marks=pytest.mark.slow)])
def test_ssp_and_asp_with_message_faults_apply_every_sample_once(tmp_path, mode):
    run = launch(tmp_path, "--job", JOB, "--workers", "2", "--servers", "2", "--steps", "30",
                 "--tasks-per-step", "4", "--mode", mode, *NOISY, timeout_s=150)
    assert run.rc == 0, run.stderr[-4000:]
    summary = run.summary
    assert [e["samples_applied"] for e in summary["per_epoch"]] == [200] * 3 + [3 * 24]
    # A push duplicated on the wire, or resent, is answered from the cache: it never even
    # reaches the task-id dedupe, and each shard applied exactly one push per task (ASP)
    # or per worker and clock (SSP).
    assert summary["duplicates_rejected"] == 0
    expected = 30 * 4 if mode == "asp" else 30 * 2
    assert [s["pushes_applied"] for s in summary["shards"]] == [expected, expected]
    assert_faults_fired(summary, servers=2, workers=2)


@pytest.mark.slow
def test_a_run_without_message_faults_reports_none(tmp_path):
    run = launch(tmp_path, "--job", JOB, "--workers", "1", "--servers", "1", "--steps", "3",
                 timeout_s=90)
    assert run.rc == 0, run.stderr[-4000:]
    assert run.summary["net_faults"] == {}
    assert "net_faults" not in run.summary["shards"][0]


@pytest.fixture
def faults(monkeypatch):
    """Install message faults in this process as a role's main would; uninstall after."""
    def install(spec: str, role: str):
        monkeypatch.setenv(messages.ENV, spec)
        monkeypatch.setattr(messages, "_sockets", itertools.count())
        monkeypatch.setattr(messages, "_counts", dict.fromkeys(messages.COUNTERS, 0))
        messages.install_from_env(role)
    monkeypatch.setattr(messages, "_faults", None)
    monkeypatch.setattr(messages, "_role", "")
    yield install


def pair(ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
    """A sender made by the roles' socket factory, and a plain receiver."""
    sender = transport.make_socket(ctx, zmq.PAIR)
    receiver = ctx.socket(zmq.PAIR)
    receiver.setsockopt(zmq.LINGER, 0)
    port = receiver.bind_to_random_port("tcp://127.0.0.1")
    sender.connect(f"tcp://127.0.0.1:{port}")
    return sender, receiver


def fates(spec: str, role: str, faults, sends: int = 200) -> list[int]:
    """How many copies of each of ``sends`` messages arrived (0 dropped, 2 duplicated)."""
    faults(spec, role)
    ctx = zmq.Context()
    sender, receiver = pair(ctx)
    try:
        for i in range(sends):
            sender.send_multipart([str(i).encode()])
        arrived = [0] * sends
        while receiver.poll(200):
            arrived[int(receiver.recv())] += 1
        return arrived
    finally:
        sender.close()
        receiver.close()
        ctx.term()


def test_without_faults_the_sockets_are_plain(faults):
    faults("", "worker0")
    assert messages.socket_class() is zmq.Socket and messages.counts() is None
    ctx = zmq.Context()
    sock = transport.make_socket(ctx, zmq.DEALER)
    assert type(sock) is zmq.Socket
    sock.close()
    ctx.term()


def test_message_faults_are_counted_and_seeded_by_run_and_role(faults):
    first = fates("drop=0.1,dup=0.1,seed=3", "worker0", faults)
    assert messages.counts() == {"dropped": first.count(0), "duplicated": first.count(2),
                                 "delayed": 0}
    assert first.count(0) > 0 and first.count(2) > 0 and set(first) == {0, 1, 2}
    assert fates("drop=0.1,dup=0.1,seed=3", "worker0", faults) == first    # reproducible
    assert fates("drop=0.1,dup=0.1,seed=3", "worker1", faults) != first    # another role
    assert fates("drop=0.1,dup=0.1,seed=4", "worker0", faults) != first    # another run


def test_a_duplicated_tracked_send_is_tracked_in_both_copies(faults):
    faults("dup=1,delay_ms=1", "server0")
    ctx = zmq.Context()
    sender, receiver = pair(ctx)
    try:
        tracker = sender.send_multipart([b"reply", memoryview(bytearray(1 << 20))], copy=False,
                                        track=True)
        assert isinstance(tracker, zmq.MessageTracker) and len(tracker.peers) == 2
        assert [len(receiver.recv_multipart()) for _ in range(2)] == [2, 2]
        tracker.wait(5)
        assert messages.counts() == {"dropped": 0, "duplicated": 1, "delayed": 1}
    finally:
        sender.close()
        receiver.close()
        ctx.term()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_scheduler_stays_to_answer_done_again_after_the_servers_left(tmp_path):
    # A worker whose DONE answer is lost asks again (same rid) and is answered from the
    # scheduler's cache, if the scheduler is still there: it stays DONE_GRACE_S after its
    # DONE answers, even when every server said bye sooner. This test is the only worker.
    with BareScheduler(tmp_path, workers=1, steps=1, tasks_per_step=1) as cluster:
        [(peer, inc)] = cluster.register(samples=4)
        task = peer.request(Kind.LEASE, 10, worker=0, inc=inc, step=0)[0]["task"]
        peer.request(Kind.REPORT, 10, worker=0, inc=inc, step=0, tasks=[task[0]], rejected=[],
                     loss_sum=1.0, samples=4, compute_s=0.01, wait_s=0.0)
        assert peer.request(Kind.DONE, 10, worker=0, inc=inc)[0]["finisher"] is True
        answered = time.monotonic()
        peer.request(Kind.FINISHED, 10, worker=0, inc=inc)
        assert cluster.proc.wait(20) == 0
        assert time.monotonic() - answered >= DONE_GRACE_S - 0.1
