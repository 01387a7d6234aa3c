"""Pull prefetch: never in BSP; in SSP the gate still bounds every read, prefetch or not.

``--prefetch push`` sends a worker's next pull right behind its push; ``compute``
as soon as a step's parameters are in. Either way the server's gate holds the
prefetched pull like any other, so the summary's max_staleness never exceeds s
(tests/test_consistency_cluster.py checks the bound exactly under a frozen worker,
with the default). The reply is copied into the model only at the next pull.
"""
import os
import threading
import types

import numpy as np
import pytest

from cluster import JOBS, launch
from inproc import InProcessServer

from ps.client import RemoteError

from worker.runner import Worker

JOB = os.path.join(JOBS, "tiny_mlp.py")


class Shards:
    def __init__(self):
        self.sent, self.abandoned = [], []

    def pull_send(self, step):
        self.sent.append(step)
        return step, [step]

    def abandon(self, pending):
        self.abandoned.append(pending)


def fake_worker(mode: str, prefetch: str):
    w = types.SimpleNamespace(config=types.SimpleNamespace(prefetch=prefetch), mode=mode,
                              prefetched=None, steps=10, shards=Shards())
    w.ahead = types.MethodType(Worker.ahead, w)
    return w


@pytest.mark.parametrize("prefetch", ["push", "compute"])
def test_bsp_never_prefetches(prefetch):
    w = fake_worker("bsp", prefetch)
    for step in range(10):
        Worker.prefetch(w, step, prefetch)
    assert w.shards.sent == [] and not w.ahead(3, prefetch)


def test_prefetch_only_when_asked_and_never_past_the_last_step():
    w = fake_worker("ssp", "compute")
    Worker.prefetch(w, 3, "push")               # not the mode chosen
    assert w.shards.sent == []
    Worker.prefetch(w, 10, "compute")           # step 10 of 10 does not exist
    assert w.shards.sent == []
    Worker.prefetch(w, 4, "compute")
    Worker.prefetch(w, 5, "compute")            # one in flight at a time
    assert w.shards.sent == [4] and w.prefetched == (4, [4])
    off = fake_worker("ssp", "off")
    for when in ("push", "compute"):
        Worker.prefetch(off, 4, when)
    assert off.shards.sent == []


def test_a_prefetch_for_another_step_is_dropped_in_ssp_and_used_in_asp():
    w = fake_worker("ssp", "compute")
    w.prefetched = (4, [4])
    assert Worker._take_prefetch(w, 5) is None and w.shards.abandoned == [(4, [4])]
    w = fake_worker("asp", "compute")
    w.prefetched = (4, [4])
    assert Worker._take_prefetch(w, 5) == (4, [4]) and w.prefetched is None


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
