"""Push while backward runs (worker/speedups/overlap.py): earlier, and still exactly the oracle.

Unit: with a fake shard client, each shard is sent from a backward hook at the moment
its slice of the flat gradient is final (a parameter straddling two shards holds both
back), the last layers' shard first; hooks do nothing unless armed. Cluster: with
``--trace``, a worker's first shard push starts before the backward of its last own
task of the step ends, and the BSP run ends on the oracle's parameters, with the
overlap (``--overlap``) and by default (no push is sent from inside backward).
"""
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from cluster import JOBS, assert_params_close, launch, oracle

from ps.wire.client import ShardInfo
from ps.trace import Tracer
from worker.flat import FlatModel
from worker.speedups.overlap import Overlap

JOB = os.path.join(JOBS, "tiny_mlp.py")
STEPS = 30


class FakeShards:
    """Records each push_send: which shard, and its slice of the gradient at that moment."""

    def __init__(self, shards):
        self.shards, self.sent, self.then_pulls = shards, [], []

    def push_send(self, grad, step, tasks, samples, step_tasks, ends_clock=True, only=None):
        (k,) = only
        s = self.shards[k]
        self.sent.append((k, grad[s.lo:s.hi].copy(), tasks, samples))
        return [(k, len(self.sent))]

    def push_wait(self, sent, step, then_pull=None):
        self.then_pulls.append(then_pull)
        return [{"shard": k, "rid": rid} for k, rid in sent]


def model_and_overlap(cuts):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))   # 25 + 18 floats
    flat = FlatModel(model, torch.device("cpu"))
    bounds = [0, *cuts, flat.grads_np.size]
    shards = FakeShards([ShardInfo(k, "", lo, hi) for k, (lo, hi) in
                         enumerate(zip(bounds, bounds[1:]))])
    return model, flat, shards, Overlap(model, flat, shards, Tracer(None, "worker", 0))


def backward(model):
    x = torch.randn(8, 4)
    (model(x).square().sum()).backward()


@pytest.mark.timeout(30)
def test_each_shard_is_sent_from_backward_once_its_slice_is_final():
    # shard 0: first weight; 1: first bias + part of the second weight (straddled); 2: the rest
    model, flat, shards, overlap = model_and_overlap([20, 30])
    backward(model)                                   # not armed: the hooks do nothing
    assert shards.sent == []
    overlap.arm(step=3, tasks=[7, 8], samples=16, step_tasks=4)
    backward(model)
    order = [k for k, *_ in shards.sent]
    assert order == [2, 1, 0]                         # backward ends at the first layer
    final = flat.grads_np.copy()
    for k, part, tasks, samples in shards.sent:       # nothing added after the send
        s = shards.shards[k]
        np.testing.assert_array_equal(part, final[s.lo:s.hi])
        assert (tasks, samples) == ([7, 8], 16)
    replies = overlap.finish(then_pull=4)            # the next step's pull, behind the pushes
    assert [r["shard"] for r in replies] == [0, 1, 2] and overlap.armed is None
    assert shards.then_pulls == [4]


@pytest.mark.timeout(30)
def test_a_shard_whose_parameters_get_no_gradient_is_sent_by_finish():
    model, flat, shards, overlap = model_and_overlap([20, 30])
    overlap.arm(step=0, tasks=[1], samples=8, step_tasks=1)
    model[0](torch.randn(8, 4)).sum().backward()     # the second layer is not in the loss
    assert [k for k, *_ in shards.sent] == [0]        # only shard 0 completes in backward
    overlap.finish()
    assert sorted(k for k, *_ in shards.sent) == [0, 1, 2]


def trace_events(out):
    with open(os.path.join(out, "trace.json")) as f:
        return json.load(f)["traceEvents"]


@pytest.fixture(scope="module")
def reference():
    return oracle(JOB, STEPS)


@pytest.mark.timeout(120)
def test_a_grad_that_left_the_flat_buffer_is_caught_before_backward():
    # A loss_fn calling model.zero_grad() sets every .grad to None: backward would then
    # accumulate into fresh tensors and the hooks would push the flat buffer without them.
    model, flat, _, _ = model_and_overlap([20])
    flat.check_grads_in_place()                       # as built: every .grad is a view
    model(torch.ones(2, 4)).sum().backward()
    flat.check_grads_in_place()                       # accumulated in place
    model.zero_grad()
    with pytest.raises(RuntimeError, match="0.weight is no longer in the flat buffer"):
        flat.check_grads_in_place()


def test_a_parameter_with_no_elements_passes_the_check():
    # torch gives a tensor of no elements no address (data_ptr() 0), view or not.
    model = nn.Sequential(nn.Linear(4, 3))
    model.register_parameter("empty", nn.Parameter(torch.zeros(0, 5)))   # (0, 5): no elements
    flat = FlatModel(model, torch.device("cpu"))
    model(torch.ones(2, 4)).sum().backward()
    flat.check_grads_in_place()


ZERO_GRAD_JOB = '''import os, sys
sys.path.insert(0, {jobs!r})
from tiny_mlp import *          # noqa: F401,F403
from tiny_mlp import loss_fn as _loss


def loss_fn(model, batch):
    model.zero_grad()           # sets every .grad to None: not allowed in a job
    return _loss(model, batch)
'''


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_job_whose_loss_fn_resets_grad_fails_and_says_why(tmp_path):
    # Before the check, backward accumulated into fresh tensors and the workers pushed
    # their flat buffers without those gradients: a run that trained on nothing.
    job = tmp_path / "zero_grad_job.py"
    job.write_text(ZERO_GRAD_JOB.format(jobs=JOBS))
    run = launch(str(tmp_path / "out"), "--job", str(job), "--workers", "2", "--servers", "2",
                 "--steps", "3")
    assert run.rc != 0
    assert "no longer in the flat buffer" in run.stderr, run.stderr[-3000:]


@pytest.mark.slow
def test_overlap_pushes_before_backward_ends_and_equals_the_oracle(tmp_path, reference):
    run = launch(tmp_path, "--job", JOB, "--workers", "2", "--servers", "3", "--mode", "bsp",
                 "--steps", str(STEPS), "--tasks-per-step", "4", "--trace", "--overlap")
    assert run.rc == 0, run.stderr[-3000:]
    assert run.summary["duplicates_rejected"] == 0
    assert_params_close(run.params, reference, rtol=1e-5)
    events = trace_events(tmp_path)
    sends = [e for e in events if e["name"] == "push shard"]
    overlapped = [e for e in events if e["name"] == "backward" and e["args"]["overlap"]]
    assert overlapped, "no backward ran with the overlap armed"
    early = 0
    for b in overlapped:
        end = b["ts"] + b["dur"]
        mine = [s["ts"] for s in sends if s["pid"] == b["pid"] and b["ts"] <= s["ts"] <= end]
        early += bool(mine) and min(mine) < end
    # the first shard's push starts inside the backward of the step's last own task
    assert early == len(overlapped)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_by_default_pushes_after_backward_and_equals_the_oracle(tmp_path, reference):
    run = launch(tmp_path, "--job", JOB, "--workers", "2", "--servers", "3", "--mode", "bsp",
                 "--steps", str(STEPS), "--tasks-per-step", "4", "--trace")
    assert run.rc == 0, run.stderr[-3000:]
    assert_params_close(run.params, reference, rtol=1e-5)
    events = trace_events(tmp_path)
    assert not [e for e in events if e["name"] == "push shard"]
    assert not [e for e in events if e["name"] == "backward" and e["args"]["overlap"]]
