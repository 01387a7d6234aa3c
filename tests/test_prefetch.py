"""Pull prefetch: in BSP only behind the push, and read exactly; in SSP the gate still
bounds every read, prefetch or not.

``--prefetch push`` sends a worker's next pull right behind its push; ``compute`` (SSP,
ASP) as soon as a step's parameters are in. Either way the server's gate holds the
prefetched pull like any other: in BSP until the step completes, and in SSP the
summary's max_staleness never exceeds s (tests/test_consistency_cluster.py checks the
bound exactly under a frozen worker, with the default). The reply is copied into the
model only at the next pull. BSP's oracle tests (test_oracle.py, and
test_stealing_cluster.py, whose stolen tasks are computed after the thief's prefetch)
run with the default, ``push``.
"""
import json
import os
import threading

import numpy as np
import pytest

from cluster import JOBS, launch
from inproc import InProcessServer

from ps.wire.client import RemoteError

from worker.speedups.prefetch import Prefetch

JOB = os.path.join(JOBS, "tiny_mlp.py")


class Shards:
    """A stand-in ShardClient: records the pulls sent and abandoned."""

    def __init__(self):
        self.sent, self.abandoned, self.ahead = [], [], None

    def pull_send(self, step):
        self.sent.append(step)
        return step, [step]

    def abandon(self, pending):
        self.abandoned.append(pending)


def prefetch(mode: str, when: str) -> Prefetch:
    return Prefetch(Shards(), when, mode, steps=10)


def test_bsp_prefetches_only_behind_its_push():
    p = prefetch("bsp", "compute")
    for step in range(10):                      # version t+1 does not exist while t computes
        p.send(step, "compute")
    assert p.shards.sent == [] and p.behind(3) is None
    p = prefetch("bsp", "push")
    assert p.behind(3) == 4                     # the next step's version, behind the push
    assert p.behind(3, ends_clock=False) is None   # a task dealt again, pushed alone
    assert p.behind(9) is None                  # step 10 of 10 does not exist
    p.shards.ahead = (4, [4])                   # the push sent it (ShardClient.ahead)
    p.sent_behind(4)
    assert p.pending == (4, [4]) and p.behind(4) is None   # one in flight at a time
    p.sent_behind(None)                         # a push with nothing behind it
    assert p.pending == (4, [4])
    assert prefetch("bsp", "off").behind(3) is None
    assert prefetch("ssp", "push").behind(3) == 4
    assert prefetch("asp", "push").behind(3) == 3   # ASP: only for staleness


@pytest.mark.timeout(30)
def test_a_bsp_pull_sent_behind_a_push_waits_for_the_step_and_reads_it_exactly():
    # A step of two tasks. The pull for version 1 sent right behind task 0's push is
    # parked (version 1 does not exist yet); task 1's push completes the step, and the
    # parked pull is answered with exactly the new version: 0 - lr * (1 + 3) / 2.
    n = 1000
    srv = InProcessServer(n, mode="bsp")        # SGD, lr 0.1
    try:
        srv.init(np.zeros(n, np.float32))
        server = threading.Thread(target=lambda: [srv.serve_one() for _ in range(2)])
        server.start()
        srv.client.push(np.ones(n, np.float32), 0, tasks=[0], samples=1, step_tasks=2,
                        then_pull=1)
        server.join(10)
        pending = srv.client.ahead
        assert pending is not None and len(srv.server.parked) == 1
        server = threading.Thread(target=srv.serve_one)
        server.start()
        srv.client.push(np.full(n, 3, np.float32), 0, tasks=[1], samples=1, step_tasks=2)
        server.join(10)
        flat = np.full(n, np.nan, np.float32)
        assert srv.client.pull_into(flat, 1, pending=pending) == [1]
        want = np.float32(0) - np.float32(0.1) * np.float32(2)
        assert np.array_equal(flat, np.full(n, want, np.float32)) and not srv.server.parked
    finally:
        srv.close()


def prefetched_pulls(out: str) -> list[bool]:
    """Per pull span of the workers' trace: whether it took a pull sent ahead."""
    with open(os.path.join(out, "trace.json")) as f:
        events = json.load(f)["traceEvents"]
    return [e["args"]["prefetched"] for e in events if e.get("name") == "pull"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bsp_gives_the_same_parameters_with_and_without_prefetch(tmp_path):
    # --no-steal: the same tasks on the same workers in both runs, so bit for bit. The
    # traces show the pulls sent behind the pushes were the ones taken: every pull but
    # each worker's first (and the finisher's final one) with push, none with off.
    steps = 30
    runs = [launch(str(tmp_path / p), "--job", JOB, "--workers", "2", "--servers", "2",
                   "--steps", str(steps), "--no-steal", "--trace", "--prefetch", p)
            for p in ("push", "off")]
    for run in runs:
        assert run.rc == 0, run.stderr[-3000:]
    pushed, plain = (run.params for run in runs)
    assert pushed.keys() == plain.keys()
    assert all(np.array_equal(pushed[k], plain[k]) for k in plain)
    used = prefetched_pulls(runs[0].out)
    assert len(used) == 2 * steps + 1 and used.count(True) == 2 * (steps - 1)
    assert not any(prefetched_pulls(runs[1].out))


def test_prefetch_only_when_asked_and_never_past_the_last_step():
    p = prefetch("ssp", "compute")
    p.send(3, "push")                           # not the mode chosen
    assert p.shards.sent == []
    p.send(10, "compute")                       # step 10 of 10 does not exist
    assert p.shards.sent == []
    p.send(4, "compute")
    p.send(5, "compute")                        # one in flight at a time
    assert p.shards.sent == [4] and p.pending == (4, [4])
    off = prefetch("ssp", "off")
    for when in ("push", "compute"):
        off.send(4, when)
    assert off.shards.sent == []


def test_a_prefetch_for_another_step_is_dropped_in_ssp_and_used_in_asp():
    p = prefetch("ssp", "compute")
    p.send(4, "compute")
    assert p.take(5) is None and p.shards.abandoned == [(4, [4])] and p.pending is None
    p = prefetch("asp", "compute")
    p.send(4, "compute")
    assert p.take(5) == (4, [4]) and p.pending is None
    p.send(6, "compute")
    assert p.take(6) == (6, [6]) and p.shards.abandoned == []


def test_a_prefetch_left_when_training_ends_is_abandoned():
    p = prefetch("ssp", "compute")
    p.drop()                                    # nothing in flight: nothing to do
    p.send(9, "compute")
    p.drop()
    assert p.shards.abandoned == [(9, [9])] and p.pending is None


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("prefetch", ["push", "compute"])
def test_ssp_with_prefetch_keeps_the_staleness_bound(tmp_path, prefetch):
    steps, s = 60, 1
    run = launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "2", "--mode", "ssp",
                 "--staleness", str(s), "--steps", str(steps), "--prefetch", prefetch)
    assert run.rc == 0, run.stderr[-3000:]
    summary = run.summary
    assert 0 <= summary["max_staleness"] <= s
    assert summary["samples"] == 6 * 200 + 6 * 24 and summary["duplicates_rejected"] == 0
    assert all(np.isfinite(v).all() for v in run.params.values())


@pytest.mark.timeout(30)
def test_a_failed_push_abandons_the_pull_sent_behind_it():
    # push(then_pull=) sends the pull before waiting for the push's answer. If the push
    # fails, nobody will take that prefetch: it is abandoned (its reply dropped when it
    # comes), not left outstanding with a model-sized reply kept for nobody.
    srv = InProcessServer(1000, mode="ssp")
    try:
        srv.init(np.zeros(1000, np.float32))
        server = threading.Thread(target=lambda: [srv.serve_one() for _ in range(2)])
        server.start()
        with pytest.raises(RemoteError):          # clock 99: beyond the staleness window
            srv.client.push(np.ones(1000, np.float32), 99, tasks=[5], samples=1,
                            step_tasks=1, then_pull=100)
        server.join(10)
        assert srv.client.ahead is None and not srv.client.peers[0].outstanding
    finally:
        srv.close()
