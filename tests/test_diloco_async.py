"""Async DiLoCo (``--mode diloco --async``): each worker's pseudo-gradient applied on arrival.

The pieces, each against what it must equal:

* ``delayed_sgd`` (Delayed Nesterov): with ``every`` 1 it is torch's SGD; ``every`` N steps
  in a row move the parameters as one torch step on their sum; no momentum, plain SGD.
* An SSP shard with ``pushes_per_round`` M applies a push as 1/M of its samples' mean; a
  ``last`` push frees the gate from its sender's clock.
* Dynamic Local Updates: a round's inner steps are H scaled by measured speed.

On the cluster: one worker's async run is the synchronous simulation (the same rounds,
and Delayed Nesterov with N = 1 is Nesterov); with several workers, a straggler, and a
worker killed mid-round, every sample is applied exactly once and no read is staler than
``--staleness`` rounds.
"""
import json
import os

import numpy as np
import pytest
import torch

from cluster import JOBS, assert_params_close, launch
from ps.core.dealer import Dealer
from ps.core.optim import make_optimizer
from ps.core.shard import Shard
from ps.core.tasks import TaskPlan
from worker import reference

JOB = os.path.join(JOBS, "tiny_mlp.py")
ADAMW = {"TINY_MLP_OPTIMIZER": json.dumps({"name": "adamw", "lr": 0.01})}
N = 64


def torch_sgd(p0, grads, **kw):
    p = torch.tensor(p0.copy(), requires_grad=True)
    opt = torch.optim.SGD([p], **kw)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach().numpy()


# -- the outer optimizer ---------------------------------------------------------------------

@pytest.mark.parametrize("nesterov", [True, False])
def test_delayed_sgd_every_step_is_torch_sgd(nesterov):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(N).astype(np.float32)
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(6)]
    p = p0.copy()
    opt = make_optimizer({"name": "delayed_sgd", "lr": 0.7, "momentum": 0.9,
                          "nesterov": nesterov, "every": 1}, N)
    for g in grads:
        opt.step(p, g)
    want = torch_sgd(p0, grads, lr=0.7, momentum=0.9, nesterov=nesterov)
    np.testing.assert_allclose(p, want, rtol=0, atol=4e-6)


@pytest.mark.parametrize("nesterov", [True, False])
def test_delayed_sgd_n_pushes_in_a_row_are_one_step_on_their_sum(nesterov):
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(N).astype(np.float32)
    rounds = [[rng.standard_normal(N).astype(np.float32) for _ in range(3)] for _ in range(4)]
    p = p0.copy()
    opt = make_optimizer({"name": "delayed_sgd", "lr": 0.7, "momentum": 0.9,
                          "nesterov": nesterov, "every": 3}, N)
    for pushes in rounds:
        for g in pushes:
            opt.step(p, g)
    want = torch_sgd(p0, [sum(r) for r in rounds], lr=0.7, momentum=0.9, nesterov=nesterov)
    np.testing.assert_allclose(p, want, rtol=0, atol=4e-6)
    # between flushes the momentum is not applied: after one push, only lr * g moved
    p = p0.copy()
    opt = make_optimizer({"name": "delayed_sgd", "lr": 0.7, "momentum": 0.9,
                          "nesterov": nesterov, "every": 3}, N)
    opt.step(p, rounds[0][0])
    np.testing.assert_array_equal(p, (p0 - np.float32(0.7) * rounds[0][0]).astype(np.float32))


def test_delayed_sgd_without_momentum_is_plain_sgd_and_keeps_its_state():
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(N).astype(np.float32)
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(5)]
    p = p0.copy()
    plain = make_optimizer({"name": "delayed_sgd", "lr": 1.0, "every": 4}, N)
    for g in grads:
        plain.step(p, g)
    np.testing.assert_allclose(p, torch_sgd(p0, grads, lr=1.0), rtol=0, atol=1e-6)
    assert set(plain.state()) == {"step"}
    # a snapshot mid-delay continues exactly
    cfg = {"name": "delayed_sgd", "lr": 0.5, "momentum": 0.9, "nesterov": True, "every": 3}
    a, b = make_optimizer(cfg, N), make_optimizer(cfg, N)
    pa, pb = p0.copy(), p0.copy()
    for g in grads[:2]:
        a.step(pa, g)
        b.step(pb, g)
    b2 = make_optimizer(cfg, N)
    b2.load_state(b.state())
    for g in grads[2:]:
        a.step(pa, g)
        b2.step(pb, g)
    np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("bad", [{"every": 0}, {"every": True}, {"momentum": -1},
                                 {"nesterov": True, "momentum": 0}, {"dampening": 0.1}])
def test_delayed_sgd_refuses_bad_arguments(bad):
    with pytest.raises(ValueError):
        make_optimizer({"name": "delayed_sgd", "lr": 0.1, "momentum": 0.9, **bad}, N)


# -- the shard --------------------------------------------------------------------------------

def ssp_shard(workers=2, staleness=1, pushes_per_round=1):
    shard = Shard(N, {"name": "sgd", "lr": 1.0}, "ssp", staleness, workers,
                  pushes_per_round=pushes_per_round)
    shard.init([np.zeros(N, np.float32)])
    return shard


def test_a_push_is_one_mth_of_its_samples_mean():
    shard = ssp_shard(pushes_per_round=4)
    grad = np.full(N, 12.0, np.float32)                 # a sum over 3 samples: mean 4
    shard.push(0, 0, [0], 3, 1, [grad])
    np.testing.assert_array_equal(shard.params, np.full(N, -1.0, np.float32))   # -lr * 4 / 4


def test_a_last_push_frees_the_gate_of_its_sender():
    shard = ssp_shard(staleness=1)
    grad = np.ones(N, np.float32)
    for clock in range(3):                               # worker 0 ahead, worker 1 at clock 0
        assert shard.pull_ready(clock) == (clock <= 1)
        shard.push(0, clock, [10 + clock], 1, 1, [grad])
    assert not shard.pull_ready(3)                      # worker 1's clock 0 holds clock 3 back
    shard.push(1, 0, [], 0, 1, [], last=True)           # worker 1 has no round left
    assert shard.pull_ready(4) and not shard.pull_ready(5)   # worker 0's clock 3 alone
    shard.push(1, 1, [20], 1, 1, [grad])                # it pushes again (a redo): gates again
    assert not shard.pull_ready(4)


# -- Dynamic Local Updates -------------------------------------------------------------------

def test_a_round_s_inner_steps_follow_measured_speed():
    dealer = Dealer(TaskPlan(400, 16, 4, seed=0, shuffle=False), 3, 100, per_epoch=True)
    assert [dealer.local_steps(w, 8) for w in range(3)] == [8, 8, 8]     # unmeasured: H
    for w, speed in enumerate([100.0, 50.0, 5.0]):
        dealer.note_speed(w, speed)
    assert [dealer.local_steps(w, 8) for w in range(3)] == [8, 4, 1]     # at least one
    dealer.gone.add(0)                                   # the fastest live one sets the pace
    assert [dealer.local_steps(w, 8) for w in (1, 2)] == [8, 1]


# -- on the cluster ----------------------------------------------------------------------------

def run_async(out, workers, servers, *flags, env=ADAMW, steps=18, inner=3, timeout_s=90.0):
    run = launch(out, "--job", JOB, "--mode", "diloco", "--async", "--inner-steps", str(inner),
                 "--workers", str(workers), "--servers", str(servers), "--steps", str(steps),
                 *flags, env=env, timeout_s=timeout_s)
    assert run.rc == 0, run.stderr[-3000:]
    return run


def every_sample_once(summary, steps, dataset=200, batch=24):
    per_epoch = steps * batch // 216 * dataset     # 9 steps an epoch: 8 of 24, one of 8
    applied = [e["samples_applied"] for e in summary["per_epoch"]]
    assert sum(applied) == summary["samples"] and applied[:per_epoch // dataset] == \
        [dataset] * (per_epoch // dataset)
    assert all(e["duplicates_rejected"] == 0 for e in summary["per_epoch"])


@pytest.mark.timeout(120)
def test_one_async_worker_is_the_synchronous_simulation(tmp_path):
    # One worker, rounds of 3 inner steps that tile the 9-step epochs (no stealing keeps
    # no task back): the same rounds as sync DiLoCo, and with N = 1 the delayed Nesterov
    # step is Nesterov's.
    os.environ.update(ADAMW)
    try:
        model, _ = reference.train_diloco(JOB, 18, 3, 1)
    finally:
        os.environ.pop("TINY_MLP_OPTIMIZER")
    run = run_async(tmp_path, 1, 2, "--no-steal")
    want = {name: p.detach().numpy() for name, p in model.named_parameters()}
    assert_params_close(run.params, want, rtol=1e-5)
    s = run.summary
    assert (s["async"], s["rounds"], s["momentum_every"], s["per_worker"][0]["tasks"]) == \
        (True, 6, 1, 18)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_async_workers_apply_every_sample_once_within_the_staleness(tmp_path):
    run = run_async(tmp_path, 3, 2, "--staleness", "1", steps=27)
    s = run.summary
    every_sample_once(s, 27)
    assert s["max_staleness"] <= 1
    assert s["rounds"] == sum(w["pushes"] for w in s["per_worker"])
    assert sum(w["tasks"] for w in s["per_worker"]) == 27 * 3    # a part per worker a step
    # it trains (the default outer Nesterov, lr 0.7 and momentum 0.9, overshoots on this
    # tiny problem later on, in sync DiLoCo alike, so the last round is not the lowest)
    assert min(s["losses"]) < 0.6 * s["losses"][0]
    assert all(np.isfinite(v).all() for v in run.params.values())


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_slow_worker_takes_fewer_inner_steps_a_round(tmp_path):
    env = {**ADAMW, "TINY_MLP_DELAY_S": "0.01"}
    run = run_async(tmp_path, 2, 2, "--slow", "1=4", "--staleness", "1", env=env,
                    steps=54, inner=8)
    s = run.summary
    fast, slow = (w["tasks"] / w["pushes"] for w in s["per_worker"])
    assert slow < fast / 1.5, s["per_worker"]
    assert s["max_staleness"] <= 1
    every_sample_once(s, 54)


def test_async_flags_belong_to_diloco(tmp_path):
    run = launch(tmp_path, "--job", JOB, "--async", "--steps", "2")
    assert run.rc == 2 and "--async and --momentum-every belong to --mode diloco" in run.stderr


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_an_async_worker_killed_mid_round_loses_only_its_round_and_is_replaced(tmp_path):
    # Worker 1 dies in a round: its leased parts are dealt again and trained by the other
    # in rounds of its own, which never waits for the dead one at the gate (it is fenced).
    # --respawn starts another worker 1, from the current parameters with a fresh inner
    # optimizer, and it trains rounds of the rest of the run.
    env = {**ADAMW, "TINY_MLP_DELAY_S": "0.05"}
    run = run_async(tmp_path, 2, 2, "--inject", "kill:worker1@step=2", "--respawn",
                    "--dead-after-s", "1.5", env=env, steps=96, inner=4)
    s = run.summary
    assert len(s["deaths"]) == 1 and s["deaths"][0]["worker"] == 1
    assert all(np.isfinite(v).all() for v in run.params.values())
    (rejoin,) = s["rejoins"]
    assert rejoin["worker"] == 1
    # its rounds came after the death (round 2 of 24, 1.5 s to detect, ~2 s to start):
    # the tally of worker 1 is both incarnations', and the first never got past round 3
    assert s["per_worker"][1]["step"] >= 8
    every_sample_once(s, 96)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_an_async_run_survives_a_scheduler_restart(tmp_path):
    env = {**ADAMW, "TINY_MLP_DELAY_S": "0.02"}
    run = run_async(tmp_path, 2, 2, "--scheduler-crash-at", "report@3", "--dead-after-s", "1.5",
                    env=env, steps=36, inner=4)
    s = run.summary
    (restart,) = s["scheduler_restarts"]
    assert restart["members_back"] == 4
    # parts pushed before the crash and dealt again are refused, not applied twice
    assert [e["samples_applied"] for e in s["per_epoch"]] == [200] * 4
    assert s["max_staleness"] <= 2
