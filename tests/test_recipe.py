"""A language model's recipe, exactly: a learning-rate schedule and global-norm clipping.

A job's ``lr_at(step)`` reaches the servers as a table of rates, one per version
(``Job.lr_table`` -> SCHEDULE -> ``Shard.set_schedule``); ``CLIP_GRAD_NORM`` clips a BSP
step's whole mean gradient once the shards agree on its norm (NORM through the scheduler:
``ps.scheduler.norms``), and each SSP/ASP push by its own (``worker.runner.clip_push``).
In-process: each piece against torch, and every refusal. Cluster: BSP with the schedule,
clipping and parameter groups, alone and together, equals ``worker.reference`` (the
single-process torch loop: ``clip_grad_norm_``, the same ``lr_at``, ``torch.optim.AdamW``
with the same groups) on 1-3 servers x 1-3 workers, with stealing, with a killed worker
and after a resume into another server count.
"""
import json
import math
import os

import numpy as np
import pytest
import torch

from cluster import JOBS, assert_params_close, check_tiny_mlp_run, launch, oracle
from ps.core.optim import make_optimizer
from ps.core.shard import Shard
from ps.scheduler.norms import KEEP_TOTALS, NormExchange
from ps.scheduler.registration import recipe
from ps.wire.protocol import Error, ProtocolError
from ps.wire.validation import lr_table
from worker.job import JobError, load_job
from worker.runner import clip_push

JOB = os.path.join(JOBS, "tiny_mlp.py")
STEPS = 36
ADAMW = {"name": "adamw", "lr": 0.02, "betas": [0.9, 0.95], "weight_decay": 0.1}
GROUPS = {"decay": {"weight_decay": 0.1}, "nodecay": {"weight_decay": 0.0, "lr": 0.01}}
SCHEDULE = [4, 30, 0.1]           # warmup 4 steps, cosine to 10% at step 30, flat after
CLIP = 0.6                        # bites on some of tiny_mlp's 36 steps and not on others


def cosine(step, top=0.02, warmup=4, decay=30, low=0.1):
    if step < warmup:
        return top * (step + 1) / (warmup + 1)
    if step > decay:
        return top * low
    return top * low + 0.5 * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup))) * top * (1 - low)


# -- the schedule on a server --------------------------------------------------------------

@pytest.mark.parametrize("config", [ADAMW, {"name": "adam", "lr": 0.01},
                                    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}])
def test_a_rate_per_step_is_torch_with_its_lr_set_each_step(config):
    rng = np.random.default_rng(0)
    p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(50).astype(np.float32)))
    ref = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[
        config["name"]]([p], **{k: v for k, v in config.items() if k != "name"})
    flat = p.detach().numpy().copy()
    opt = make_optimizer(config, flat.size, chunk=7)
    for step in range(12):
        g = rng.standard_normal(50).astype(np.float32)
        lr = cosine(step, top=config["lr"])
        opt.set_lr(lr)
        opt.step(flat, g)
        ref.param_groups[0]["lr"] = lr
        p.grad = torch.from_numpy(g)
        ref.step()
    np.testing.assert_allclose(flat, p.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_a_group_with_its_own_lr_is_scaled_as_lambda_lr_scales_it():
    # torch's LambdaLR: every group's lr = its initial lr * lambda(step); the schedule's
    # lambda is lr_at(step) / OPTIMIZER["lr"]. A group without its own lr takes lr_at.
    opt = make_optimizer(ADAMW, 10, segments=[[0, 6, {}], [6, 10, {"lr": 0.005}]])
    opt.set_lr(0.01)
    assert [part.lr for part in opt.parts] == [0.01, 0.005 * (0.01 / 0.02)]


def test_a_shard_uses_the_rate_of_the_version_each_update_starts_from():
    shard = Shard(4, {"name": "sgd", "lr": 1.0}, "asp", 0, 1, lr_versions=3)
    shard.init([np.zeros(4, np.float32)])
    with pytest.raises(ProtocolError) as err:                 # no schedule yet: no update
        shard.push(0, 0, [0], 1, 1, [np.ones(4, np.float32)])
    assert err.value.code == Error.NOT_READY
    assert shard.set_schedule(np.array([0.5, 0.25, 0.0]))
    assert not shard.set_schedule(np.array([0.5, 0.25, 0.0]))    # the same again: no change
    with pytest.raises(ProtocolError, match="differing"):
        shard.set_schedule(np.array([0.5, 0.25, 1.0]))
    with pytest.raises(ProtocolError, match="3 rates"):
        shard.set_schedule(np.array([0.5, 0.25]))
    for task in range(4):                                     # versions 0, 1, 2, then past the end
        shard.push(0, task, [task], 1, 1, [np.ones(4, np.float32)])
    assert shard.params[0] == pytest.approx(-(0.5 + 0.25 + 0.0 + 0.0))


def frames(table):
    return [np.asarray(table, "<f8").tobytes()]


@pytest.mark.parametrize("table,code", [([0.1, float("nan")], Error.BAD_FIELD),
                                        ([0.1, float("inf")], Error.BAD_FIELD),
                                        ([0.1, -1e-9], Error.BAD_FIELD)])
def test_a_rate_that_is_nan_infinite_or_negative_is_refused(table, code):
    with pytest.raises(ProtocolError) as err:
        lr_table(frames(table), 2)
    assert err.value.code == code and "version 1" in err.value.reason


@pytest.mark.parametrize("payload,versions", [([b"\0" * 12], 2), ([b"\0" * 8], 2), ([], 0),
                                              ([b"\0" * 7, b"\0"], 1)])
def test_a_schedule_of_the_wrong_bytes_is_refused(payload, versions):
    with pytest.raises(ProtocolError) as err:
        lr_table(payload, versions)
    assert err.value.code == Error.BAD_PAYLOAD


def test_the_table_is_lr_at_of_each_version_and_a_bad_rate_is_a_job_error(monkeypatch):
    monkeypatch.setenv("TINY_MLP_OPTIMIZER", json.dumps(ADAMW))
    monkeypatch.setenv("TINY_MLP_SCHEDULE", json.dumps(SCHEDULE))
    job = load_job(JOB)
    table = job.lr_table(40)
    assert table.tolist() == [job.lr_at(v) for v in range(40)]
    np.testing.assert_allclose(table, [cosine(v) for v in range(40)], rtol=1e-12)
    assert table[0] < table[3] < table[4] and table[4] == pytest.approx(0.02)
    assert table[4] > table[20] > table[35] == pytest.approx(0.002)
    job.lr_at = lambda step: float("nan") if step == 3 else 0.1
    with pytest.raises(JobError) as err:
        job.lr_table(5)
    assert err.value.function == "lr_at" and "lr_at(3) = nan" in err.value.error


@pytest.mark.parametrize("name,value,words", [("CLIP_GRAD_NORM", "0", "CLIP_GRAD_NORM"),
                                              ("CLIP_GRAD_NORM", "-1", "CLIP_GRAD_NORM"),
                                              ("CLIP_GRAD_NORM", "float('inf')", "CLIP_GRAD_NORM"),
                                              ("AUTOCAST", "'float8'", "AUTOCAST"),
                                              ("lr_at", "0.1", "lr_at")])
def test_a_bad_recipe_is_refused_when_the_job_loads(tmp_path, name, value, words):
    path = tmp_path / "job.py"
    path.write_text(open(JOB).read() + f"\n{name} = {value}\n")
    with pytest.raises(ValueError, match=words):
        load_job(str(path))


@pytest.mark.parametrize("change", [{"clip": 0}, {"clip": -1.0}, {"clip": float("inf")},
                                    {"clip": True}, {"clip": "1"}, {"lr_at": 1},
                                    {"lr_at": True, "optimizer": {"name": "sgd", "lr": 0.0}}])
def test_the_scheduler_refuses_a_bad_recipe(change):
    info = {"lr_at": None, "clip": None, "optimizer": {"name": "sgd", "lr": 0.1},
            "param_groups": [[0, 4, {}], [4, 10, {"lr": 0.5}]], **change}
    with pytest.raises(ProtocolError) as err:
        recipe(info)
    assert err.value.code == Error.BAD_FIELD


# -- clipping: the norm agreement -------------------------------------------------------------

def test_the_exchange_answers_every_shard_once_all_parts_are_in_and_repeats_alike():
    norms = NormExchange(3)
    assert norms.offer(7, 2, 4.0, "c") is None
    assert norms.offer(7, 0, 9.0, "a") is None
    assert norms.offer(7, 0, 9.0, "a2") is None                # a resend: its part once
    assert sorted(norms.offer(7, 1, 12.0, "b")) == ["a2", "b", "c"]
    assert norms.total(7) == 5.0
    assert norms.offer(7, 2, 4.0, "late") == ["late"]         # heard no answer: the same total
    for step in range(8, 8 + KEEP_TOTALS):
        for shard in range(3):
            norms.offer(step, shard, 0.0, shard)
    assert 7 not in norms.totals and len(norms.totals) == KEEP_TOTALS


@pytest.fixture
def scheduler():
    """A scheduler of 2 servers in its training phase, its replies recorded, not sent."""
    from ps.scheduler.config import SchedulerConfig
    from ps.scheduler.runstate import RunState
    from ps.scheduler.scheduler import Scheduler
    sched = Scheduler(SchedulerConfig(servers=2))
    sched.phase, sched.run = "training", RunState(10, 1, 10)
    incs = [sched.members.join("server", k, now=0.0).inc for k in range(2)]
    sched.sent = []
    sched.reply = lambda ident, kind, rid, **fields: sched.sent.append((ident, rid, fields))
    yield sched, incs
    sched.close()


def norm(index, inc, step=3, sumsq=1.0, **more):
    from ps.wire.protocol import Kind, decode, encode
    return decode(encode(Kind.NORM, 10 + index, index=index, inc=inc, step=step, sumsq=sumsq,
                         **more))


@pytest.mark.parametrize("change", [{"step": 10}, {"step": -1}, {"sumsq": -1.0}, {"index": 2},
                                    {"nonfinite": "ignore"}])
def test_the_scheduler_refuses_a_bad_norm_and_keeps_nothing(scheduler, change):
    sched, incs = scheduler
    header = norm(0, incs[0], **{k: v for k, v in change.items() if k != "index"})
    header.update({k: v for k, v in change.items() if k == "index"})
    with pytest.raises(ProtocolError) as err:
        sched.on_norm(b"s0", header)
    assert err.value.code in (Error.BAD_FIELD, Error.UNKNOWN_SENDER)
    assert sched.norms.parts == {} and sched.sent == []


def test_the_scheduler_answers_both_shards_with_the_total(scheduler):
    sched, incs = scheduler
    sched.on_norm(b"s1", norm(1, incs[1], sumsq=16.0))
    assert sched.sent == []                                  # held until shard 0's part
    sched.on_norm(b"s0", norm(0, incs[0], sumsq=9.0))
    assert sorted(sched.sent) == [(b"s0", 10, {"norm_step": 3, "total_norm": 5.0, "skip": False}),
                                  (b"s1", 11, {"norm_step": 3, "total_norm": 5.0, "skip": False})]


@pytest.mark.parametrize("policy", ["skip", "reject"])
def test_a_norm_that_is_not_finite_follows_nonfinite(scheduler, policy):
    sched, incs = scheduler
    sched.on_norm(b"s0", norm(0, incs[0], sumsq=float("inf"), nonfinite=policy))
    sched.on_norm(b"s1", norm(1, incs[1], sumsq=1.0, nonfinite=policy))
    if policy == "skip":                                     # every shard: a zero gradient
        assert [f["skip"] for _, _, f in sched.sent] == [True, True] and sched.failure is None
    else:                                                    # the run stops, naming the step
        assert sched.sent == [] and "step 3: the gradient's global norm is inf" in sched.failure


def bsp_shards(bounds, clip, config=ADAMW):
    shards = [Shard(hi - lo, config, "bsp", 0, 2, clip=clip) for lo, hi in bounds]
    for s in shards:
        s.init([np.zeros(s.size, np.float32)])
    return shards


@pytest.mark.parametrize("clip", [0.5, 100.0], ids=["bites", "does-not-bite"])
def test_shards_that_agree_on_the_norm_step_as_clip_grad_norm_does(clip):
    bounds = [(0, 7), (7, 20)]
    shards = bsp_shards(bounds, clip)
    p = torch.nn.Parameter(torch.zeros(20))
    ref = torch.optim.AdamW([p], **{k: v for k, v in ADAMW.items() if k != "name"})
    rng = np.random.default_rng(3)
    clipped = 0
    for step in range(5):
        a, b = (rng.standard_normal(20).astype(np.float32) for _ in range(2))
        norms = NormExchange(len(shards))
        for k, ((lo, hi), s) in enumerate(zip(bounds, shards)):
            s.push(0, step, [2 * step], 3, 2, [a[lo:hi] * 3])      # 3 samples and 5 samples
            s.push(1, step, [2 * step + 1], 5, 2, [b[lo:hi] * 5])
            assert s.norm_wait == step and s.version == step      # held: not applied yet
            assert not s.pull_ready(step + 1)
            answer = norms.offer(step, k, s.partial_sumsq, k)
        assert answer is not None
        for s in shards:
            assert s.finish_step(step, norms.total(step))
            assert not s.finish_step(step, norms.total(step))   # a repeated answer: nothing
        mean = torch.from_numpy((a * 3 + b * 5) / np.float32(8))
        p.grad = mean.clone()
        total = torch.nn.utils.clip_grad_norm_([p], clip)
        clipped += bool(total > clip)
        assert norms.total(step) == pytest.approx(float(total), rel=1e-6)
        ref.step()
    got = np.concatenate([s.params for s in shards])
    np.testing.assert_allclose(got, p.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert shards[0].clipped_steps == clipped == (5 if clip < 1 else 0)


def test_a_held_step_refuses_its_tasks_again_and_says_what_it_waits_for():
    (shard,) = bsp_shards([(0, 4)], 1.0)
    shard.push(0, 0, [0], 2, 1, [np.ones(4, np.float32)])
    assert not shard.push(1, 0, [0], 2, 1, [np.ones(4, np.float32)])   # a duplicate
    assert shard.duplicates_rejected == 1 and shard.partial_sumsq == pytest.approx(1.0)
    assert "global gradient norm" in shard.waiting(1)


def test_a_nonfinite_norm_under_skip_applies_a_zero_gradient():
    (shard,) = bsp_shards([(0, 4)], 1.0, {"name": "sgd", "lr": 1.0})
    shard.push(0, 0, [0], 1, 1, [np.ones(4, np.float32)])
    shard.finish_step(0, float("inf"), skip=True)
    assert shard.version == 1 and np.array_equal(shard.params, np.zeros(4, np.float32))


@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_an_ssp_push_is_clipped_by_its_own_norm_as_torch_clips_it(scale):
    rng = np.random.default_rng(5)
    mean = (rng.standard_normal(30) * scale).astype(np.float32)
    grads = mean * np.float32(6)                           # a push: the sum over 6 samples
    coef = clip_push(grads, 6, 1.0)
    p = torch.nn.Parameter(torch.zeros(30))
    p.grad = torch.from_numpy(mean.copy())
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    np.testing.assert_allclose(grads / 6, p.grad.numpy(), rtol=1e-6)
    assert (coef < 1) == (scale > 1)


# -- the cluster: BSP equals the single-process loop with the same recipe ---------------------

def recipe_env(groups=True, schedule=True, clip=True):
    env = {"TINY_MLP_OPTIMIZER": json.dumps(ADAMW)}
    if groups:
        env["TINY_MLP_GROUPS"] = json.dumps(GROUPS)
    if schedule:
        env["TINY_MLP_SCHEDULE"] = json.dumps(SCHEDULE)
    if clip:
        env["TINY_MLP_CLIP"] = str(CLIP)
    return env


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(**parts):
        key = tuple(sorted(parts.items()))
        if key not in cache:
            cache[key] = oracle(JOB, STEPS, env=recipe_env(**parts))
        return cache[key]
    return get


def check_clipping(run, clip: bool):
    steps = {s["clipped_steps"] for s in run.summary["shards"]}
    assert len(steps) == 1                       # every shard clipped the same steps
    if clip:
        assert 0 < steps.pop() < STEPS           # steps where it bites, and where it does not
    else:
        assert steps == {0}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers,servers", [(2, 3), pytest.param(1, 1, marks=pytest.mark.slow),
                                             pytest.param(3, 2, marks=pytest.mark.slow)])
def test_bsp_with_the_whole_recipe_equals_the_single_process_loop(tmp_path, references, workers,
                                                                  servers):
    run = launch(tmp_path, "--job", JOB, "--workers", str(workers), "--servers", str(servers),
                 "--steps", str(STEPS), env=recipe_env())
    assert run.rc == 0, run.stderr[-3000:]
    assert_params_close(run.params, references(), rtol=1e-5)
    check_clipping(run, clip=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("part", [pytest.param("schedule", marks=pytest.mark.slow), "clip"])
def test_each_piece_alone_equals_the_loop_and_matters(tmp_path, references, part):
    alone = {"groups": False, "schedule": part == "schedule", "clip": part == "clip"}
    run = launch(tmp_path, "--job", JOB, "--workers", "2", "--servers", "2",
                 "--steps", str(STEPS), env=recipe_env(**alone))
    assert run.rc == 0, run.stderr[-3000:]
    want = references(**alone)
    assert_params_close(run.params, want, rtol=1e-5)
    check_clipping(run, clip=part == "clip")
    plain = references(groups=False, schedule=False, clip=False)
    assert any(not np.allclose(want[k], plain[k], rtol=1e-3) for k in want)   # it mattered


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_the_recipe_with_a_slow_worker_and_stealing_equals_the_loop(tmp_path, references):
    run = launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "2", "--steps", str(STEPS),
                 "--tasks-per-step", "12", "--slow", "1=4", env=recipe_env())
    assert run.rc == 0, run.stderr[-3000:]
    assert run.summary["per_worker"][1]["stolen_from"] > 0
    assert_params_close(run.params, references(), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_the_recipe_with_a_killed_worker_equals_the_loop(tmp_path, references):
    run = launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "2", "--steps", str(STEPS),
                 "--tasks-per-step", "6", "--no-steal", "--crash-at", "1:mid_push@20",
                 "--dead-after-s", "1.5", env=recipe_env())
    check_tiny_mlp_run(run, references(), STEPS, deaths=1)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_recipe_resumes_into_another_server_count(tmp_path, references):
    ckpt = ["--checkpoint-every", "10", "--checkpoint-dir", str(tmp_path / "checkpoints")]
    first = launch(tmp_path / "a", "--job", JOB, "--steps", "20", "--servers", "2", *ckpt,
                   env=recipe_env())
    assert first.rc == 0, first.stderr[-3000:]
    run = launch(tmp_path / "b", "--job", JOB, "--steps", str(STEPS), "--servers", "3", *ckpt,
                 "--resume", env=recipe_env())
    assert run.rc == 0, run.stderr[-3000:]
    assert run.summary["resumed_from"]["version"] == 20
    assert_params_close(run.params, references(), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ssp_follows_the_schedule_by_version(tmp_path, mode="ssp"):
    # A schedule of zeros: no update moves a parameter (AdamW's decay is lr * wd too), so
    # the run must end where it began; the same run without it does move.
    zero = os.path.join(tmp_path, "zero.py")
    with open(zero, "w") as f:
        f.write(open(JOB).read() + "\n\ndef lr_at(step):\n    return 0.0\n")
    env = {**recipe_env(groups=False, schedule=False), "TINY_MLP_OPTIMIZER": json.dumps(ADAMW)}
    run = launch(tmp_path / "run", "--job", zero, "--mode", mode, "--staleness", "1",
                 "--workers", "2", "--servers", "2", "--steps", "9", env=env)
    assert run.rc == 0, run.stderr[-3000:]
    start = oracle(JOB, 0, env=env)
    assert_params_close(run.params, start, rtol=0)
    moved = launch(tmp_path / "moved", "--job", JOB, "--mode", mode, "--staleness", "1",
                   "--workers", "2", "--servers", "2", "--steps", "9", env=env)
    assert moved.rc == 0, moved.stderr[-3000:]
    assert any(not np.allclose(moved.params[k], start[k]) for k in start)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_asp_clips_each_push_by_its_own_norm(tmp_path, mode="asp"):
    # Plain SGD, every push clipped to a norm of 1e-4: each update moves the parameters by
    # at most lr * 1e-4, so after 9 steps of 3 pushes each no parameter can have moved
    # 0.05 * 27 * 1e-4; unclipped, the same run moves them by far more.
    env = {"TINY_MLP_OPTIMIZER": '{"name": "sgd", "lr": 0.05}', "TINY_MLP_CLIP": "1e-4"}
    flags = ["--job", JOB, "--mode", mode, "--staleness", "1", "--workers", "3",
             "--servers", "2", "--steps", "9", "--tasks-per-step", "3"]
    run = launch(tmp_path / "clip", *flags, env=env)
    assert run.rc == 0, run.stderr[-3000:]
    start = oracle(JOB, 0, env=env)
    moved = max(float(np.abs(run.params[k] - start[k]).max()) for k in start)
    assert 0 < moved <= 0.05 * 27 * 1e-4 * 1.01
    free = launch(tmp_path / "free", *flags, env={k: v for k, v in env.items()
                                                   if k != "TINY_MLP_CLIP"})
    assert free.rc == 0, free.stderr[-3000:]
    assert max(float(np.abs(free.params[k] - start[k]).max()) for k in start) > 1e-2
