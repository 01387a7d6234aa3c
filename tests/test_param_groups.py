"""Parameter groups: nanoGPT's weight decay on the 2-D weights only, exactly as torch does it.

A job's ``param_groups(model)`` names the parameters of each group (torch's groups, with
names instead of tensors); the worker turns them into ranges of the flat vector
(``worker.job.flat_groups``), the scheduler checks them (``registration.param_groups``),
and each server cuts them at its own bounds (``server.segments``) and steps one optimizer
per segment (``ps.core.param_groups.Grouped``). In-process: the pieces against torch.optim with
the same groups, and every refusal. Cluster: BSP on 1-3 servers x 1-3 workers equals
single-process torch with the same groups.
"""
import json
import os

import numpy as np
import pytest
import torch

from cluster import JOBS, assert_params_close, launch, oracle
from ps.core.optim import make_optimizer
from ps.scheduler.registration import param_groups as check_groups
from ps.server.server import segments
from ps.wire.protocol import Error, ProtocolError
from worker.job import flat_groups

JOB = os.path.join(JOBS, "tiny_mlp.py")
STEPS = 40
GROUPS = {"decay": {"weight_decay": 0.1}, "nodecay": {"weight_decay": 0.0, "lr": 0.02}}
ADAMW = {"name": "adamw", "lr": 0.01, "betas": [0.9, 0.95]}


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def nanogpt_groups(model):
    named = list(model.named_parameters())
    return [{"params": [n for n, p in named if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [n for n, p in named if p.dim() < 2], "weight_decay": 0.0}]


# -- the worker: names -> ranges ----------------------------------------------------------

def test_groups_of_names_become_ranges_of_the_flat_vector():
    model = mlp()                               # 0.weight 12, 0.bias 4, 2.weight 8, 2.bias 2
    got = flat_groups(nanogpt_groups(model), model, ADAMW)
    assert got == [[0, 12, {"weight_decay": 0.1}], [12, 16, {"weight_decay": 0.0}],
                   [16, 24, {"weight_decay": 0.1}], [24, 26, {"weight_decay": 0.0}]]
    one = flat_groups([{"params": [n for n, _ in model.named_parameters()]}], model, ADAMW)
    assert one == [[0, 26, {}]]                 # neighbours of one group merge


@pytest.mark.parametrize("groups,words", [
    (lambda names: [{"params": names[1:]}], "'0.weight' is in no group"),
    (lambda names: [{"params": names}, {"params": names[:1]}], "'0.weight' is in groups 0 and 1"),
    (lambda names: [{"params": names + ["head.weight"]}], "'head.weight' is not a parameter"),
    (lambda names: [{"params": names, "momentum": 0.9}], "unknown argument"),
    (lambda names: [{"params": names, "lr": -1.0}], "lr"),
    (lambda names: {"params": names}, "a list of dicts"),
])
def test_a_bad_group_is_refused_naming_the_parameter(groups, words):
    model = mlp()
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match=words):
        flat_groups(groups(names), model, ADAMW)


# -- the scheduler: what a REGISTER may say -----------------------------------------------

@pytest.mark.parametrize("groups", [
    [], "x", [[0, 10]], [[0, 5, {}], [6, 10, {}]], [[0, 5, {}], [5, 11, {}]], [[0, 5, {}]],
    [[0, 10, {"name": "sgd"}]], [[0, 10, {"lr": "fast"}]], [[0, 10, {"nope": 1}]],
    [[True, 10, {}]],
])
def test_the_scheduler_refuses_groups_that_do_not_cover_the_model_or_the_optimizer(groups):
    with pytest.raises(ProtocolError) as err:
        check_groups(groups, ADAMW, 10)
    assert err.value.code == Error.BAD_FIELD


def test_the_scheduler_accepts_none_and_a_cover():
    check_groups(None, ADAMW, 10)
    check_groups([[0, 4, {"weight_decay": 0.1}], [4, 10, {}]], ADAMW, 10)


# -- the server: groups cut at its bounds ---------------------------------------------------

def test_a_server_cuts_the_groups_at_its_own_bounds():
    groups = [[0, 12, {"weight_decay": 0.1}], [12, 16, {}], [16, 26, {"lr": 0.5}]]
    assert segments(groups, 10, 20) == [[0, 2, {"weight_decay": 0.1}], [2, 6, {}],
                                        [6, 10, {"lr": 0.5}]]
    assert segments(groups, 0, 12) == [[0, 12, {"weight_decay": 0.1}]]
    assert segments(None, 0, 12) is None


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_grouped_steps_are_torch_with_the_same_groups(name):
    # A BSP step: the mean of a sum, the previous version kept in the sum's own buffer
    # (keep=grad), in chunks of 3 that the segment bounds cut anywhere.
    config = ADAMW if name == "adamw" else {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    model = mlp()
    groups = nanogpt_groups(model)
    ranges = flat_groups(groups, model, config)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()
    opt = make_optimizer(config, flat.size, segments=ranges, chunk=3)
    named = dict(model.named_parameters())
    ref = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name](
        [{**g, "params": [named[n] for n in g["params"]]} for g in groups],
        **{k: v for k, v in config.items() if k != "name"})
    rng = np.random.default_rng(1)
    for _ in range(6):
        g = rng.standard_normal(flat.size).astype(np.float32)
        total = (4 * g).astype(np.float32)
        old = flat.copy()
        opt.step(flat, total, divide_by=4, keep=total)
        assert np.array_equal(total, old)               # the previous version, kept
        offset = 0
        for p in model.parameters():
            p.grad = torch.from_numpy(g[offset:offset + p.numel()].reshape(p.shape).copy())
            offset += p.numel()
        ref.step()
    want = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    np.testing.assert_allclose(flat, want, rtol=1e-6, atol=1e-7)
    state = opt.state()
    again = make_optimizer(config, flat.size, segments=ranges)
    again.load_state(state)
    assert all(np.array_equal(again.state()[k], state[k]) for k in state if k != "step")


def test_grouped_reads_a_gradient_in_frames_across_segment_bounds():
    ranges = [[0, 7, {"weight_decay": 0.1}], [7, 20, {"weight_decay": 0.0}]]
    a = make_optimizer(ADAMW, 20, segments=ranges)
    b = make_optimizer(ADAMW, 20, segments=ranges)
    pa = np.linspace(-1, 1, 20, dtype=np.float32)
    pb = pa.copy()
    g = np.arange(20, dtype=np.float32) / 10
    a.step(pa, g)
    b.step(pb, [g[:3], g[3:11], g[11:]])                  # frames cut elsewhere than groups
    assert np.array_equal(pa, pb)


# -- the cluster: BSP equals single-process torch with the same groups ---------------------

@pytest.fixture(scope="module")
def reference():
    env = {"TINY_MLP_OPTIMIZER": json.dumps(ADAMW), "TINY_MLP_GROUPS": json.dumps(GROUPS)}
    return env, oracle(JOB, STEPS, env=env)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers,servers", [(2, 3), pytest.param(1, 1, marks=pytest.mark.slow),
                                             pytest.param(3, 2, marks=pytest.mark.slow)])
def test_bsp_with_param_groups_equals_torch_with_the_same_groups(tmp_path, reference, workers,
                                                                  servers):
    env, want = reference
    run = launch(tmp_path, "--job", JOB, "--workers", str(workers), "--servers", str(servers),
                 "--steps", str(STEPS), env=env)
    assert run.rc == 0, run.stderr[-3000:]
    assert_params_close(run.params, want, rtol=1e-5)
    # the groups made a difference: without them (decay 0.01 everywhere) the result differs
    other = oracle(JOB, STEPS, env={k: v for k, v in env.items() if k != "TINY_MLP_GROUPS"})
    assert any(not np.allclose(want[k], other[k], rtol=1e-4) for k in want)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_param_groups_resume_into_another_server_count(tmp_path, reference):
    # A grouped shard's optimizer state is laid out as an ungrouped one's (each array the
    # segments' end to end), so a checkpoint of 2 shards resumes on 3, cut elsewhere.
    env, want = reference
    ckpt = ["--checkpoint-every", "10", "--checkpoint-dir", str(tmp_path / "checkpoints")]
    first = launch(tmp_path / "a", "--job", JOB, "--steps", "20", "--servers", "2", *ckpt, env=env)
    assert first.rc == 0, first.stderr[-3000:]
    run = launch(tmp_path / "b", "--job", JOB, "--steps", str(STEPS), "--servers", "3", *ckpt,
                 "--resume", env=env)
    assert run.rc == 0, run.stderr[-3000:]
    assert run.summary["resumed_from"]["version"] == 20
    assert_params_close(run.params, want, rtol=1e-5)
