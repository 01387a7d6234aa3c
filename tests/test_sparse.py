"""Sparse embedding tables (``ps.sparse``, ``worker.sparse``): rows on the servers only.

In-process, each piece against what it must equal: ``initial_rows`` a function of
(seed, table, id) alone; the id index against a dict; the per-row optimizers against
torch's own sparse ones (``Adagrad`` with a sparse gradient, ``SparseAdam``, ``SGD``), with
a step's rows split over pushes and workers as a cluster splits them; exactly once by
task id; refusals. On the cluster: BSP with a table equals single-process torch
(``nn.EmbeddingBag(N, dim, sparse=True)`` started from ``initial_rows``) on 1-3 servers x
1-3 workers, and with a straggler stealing.
"""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from cluster import JOBS, launch
from ps import sparse
from ps.core.tasks import TaskPlan
from ps.server.sparse_tables import Tables
from ps.sparse import Gone, RowIndex, SparseTable, check_spec, initial_rows, server_of, vshard_of
from ps.wire import transport, validation
from ps.wire.protocol import Error, ProtocolError

JOB = os.path.join(JOBS, "sparse_bag.py")
TORCH_OPT = {"adagrad": torch.optim.Adagrad, "adam": torch.optim.SparseAdam, "sgd": torch.optim.SGD}


# -- first values and where rows live ----------------------------------------------------------

def test_initial_rows_depend_on_seed_table_and_id_alone():
    ids = np.array([5, 2**40 + 7, -3, 0, 99], np.int64)
    rows = initial_rows(7, "items", ids, 8, 0.02)
    assert rows.dtype == np.float32 and rows.shape == (5, 8)
    # the same row whatever else is asked with it, in whatever order
    np.testing.assert_array_equal(initial_rows(7, "items", ids[::-1], 8, 0.02), rows[::-1])
    np.testing.assert_array_equal(initial_rows(7, "items", ids[2:3], 8, 0.02), rows[2:3])
    # a first 4 columns are a prefix of 8: column j depends on j, not on dim
    np.testing.assert_array_equal(initial_rows(7, "items", ids, 4, 0.02), rows[:, :4])
    assert not np.array_equal(initial_rows(8, "items", ids, 8, 0.02), rows)
    assert not np.array_equal(initial_rows(7, "users", ids, 8, 0.02), rows)
    np.testing.assert_array_equal(initial_rows(7, "items", ids, 8, 0.0), np.zeros((5, 8), np.float32))
    many = initial_rows(0, "t", np.arange(20000), 16, 0.5)
    assert abs(many.mean()) < 0.01 and abs(many.std() - 0.5) < 0.01


def test_ids_spread_over_virtual_shards_and_a_reshard_moves_whole_ones():
    ids = np.random.default_rng(0).integers(-2**62, 2**62, 50000)
    v = vshard_of(ids)
    assert v.min() >= 0 and v.max() < sparse.VSHARDS
    counts = np.bincount(server_of(ids, 4), minlength=4)
    assert counts.min() > 0.9 * ids.size / 4                # balanced
    # from 2 servers to 4: every id of server k moves to server 2k or 2k + 1
    two, four = server_of(ids, 2), server_of(ids, 4)
    assert ((four // 2) == two).all()
    # the server is a function of the virtual shard alone
    assert all(len(set(four[v == s])) <= 1 for s in np.unique(v)[:200])


def test_the_index_finds_what_was_added_and_costs_12_bytes_a_row():
    rng = np.random.default_rng(1)
    index, truth = RowIndex(), {}
    for batch in range(40):
        ids = np.unique(rng.integers(0, 10**8, 500))
        found = index.lookup(ids)
        for i, f in zip(ids, found):
            assert f == truth.get(int(i), -1)
        new, first = ids[found < 0], len(truth)
        index.add(new, first)
        for k, i in enumerate(new):
            truth[int(i)] = first + k                         # rows numbered as added
    assert len(index) == len(truth)
    ids, pos = index.items()
    assert (np.diff(ids) > 0).all() and sorted(pos) == list(range(len(truth)))
    assert all(truth[int(i)] == p for i, p in zip(ids[:300], pos[:300]))
    assert index.nbytes() == 12 * len(truth)


# -- per-row optimizers against torch --------------------------------------------------------------

def table(opt, n=30, dim=3, std=0.1, seed=4):
    spec = check_spec({"name": "items", "dim": dim, "num_embeddings": n, "init_std": std,
                       "optimizer": opt})
    return SparseTable(spec, seed)


@pytest.mark.parametrize("opt", [{"name": "adagrad", "lr": 0.3, "lr_decay": 0.01},
                                 {"name": "adam", "lr": 0.05, "betas": [0.8, 0.9]},
                                 {"name": "sgd", "lr": 0.2}])
def test_a_step_split_over_workers_equals_torch_on_the_whole_batch(opt):
    n, dim = 30, 3
    t = table(opt, n, dim)
    emb = torch.nn.Embedding.from_pretrained(torch.from_numpy(initial_rows(4, "items", np.arange(n), dim, 0.1)),
                                             freeze=False, sparse=True)
    args = {k: (tuple(v) if k == "betas" else v) for k, v in opt.items() if k != "name"}
    ref = TORCH_OPT[opt["name"]](emb.parameters(), **args)
    rng = np.random.default_rng(0)
    for step in range(8):
        ids = rng.integers(0, n if step % 3 else 6, 12)        # some steps touch few rows
        target = torch.from_numpy(rng.standard_normal((12, dim)).astype(np.float32))
        ref.zero_grad()
        ((emb(torch.from_numpy(ids)) - target) ** 2).sum(1).mean().backward()
        ref.step()
        parts = [slice(0, 5), slice(5, 6), slice(6, 12)]        # 3 tasks, pushed in any order
        pushes = []
        for k, part in enumerate(parts):
            u, inv = np.unique(ids[part], return_inverse=True)
            rows = torch.from_numpy(t.pull(u)).requires_grad_(True)
            ((rows[torch.from_numpy(inv)] - target[part]) ** 2).sum(1).sum().backward()
            pushes.append(([10 * step + k], part.stop - part.start, u, rows.grad.numpy()))
        for tasks, samples, u, g in pushes[::-1]:
            assert t.push(step, tasks, samples, 3, u, g)
    np.testing.assert_allclose(t.pull(np.arange(n)), emb.weight.detach().numpy(), rtol=0, atol=2e-6)
    assert t.version == 8


def test_a_push_whose_tasks_are_in_is_refused_and_changes_nothing():
    t = table({"name": "adagrad", "lr": 0.5})
    g = np.ones((2, 3), np.float32)
    assert t.push(0, [1], 4, 2, np.array([3, 4]), g)
    assert not t.push(0, [1], 4, 2, np.array([3, 4]), g)       # the same task again
    assert t.version == 0 and t.duplicates_rejected == 1
    assert t.push(0, [2], 4, 2, np.array([4]), g[:1])
    before = t.pull(np.array([3, 4])).copy()
    assert not t.push(0, [2], 4, 2, np.array([4]), g[:1])      # a late copy of a done step
    np.testing.assert_array_equal(t.pull(np.array([3, 4])), before)
    with pytest.raises(ValueError, match="outside"):
        t.pull(np.array([30]))
    with pytest.raises(ValueError, match="step 3"):
        t.push(3, [9], 1, 1, np.array([1]), g[:1])


def test_a_pull_one_step_behind_reads_the_rows_that_step_had():
    # A task of step 1, computed again after the table applied step 1 (its first worker
    # died between its sparse push and its dense one), must read version 1's rows.
    t = table({"name": "sgd", "lr": 1.0})
    g = np.ones((2, 3), np.float32)
    assert t.push(0, [1], 1, 1, np.array([3, 4]), g)           # step 0: version 1
    at_1 = t.pull(np.array([3, 4, 5]), step=1).copy()
    assert t.push(1, [2], 1, 1, np.array([4, 9]), g)           # step 1: version 2, rows 4 and 9
    now = t.pull(np.array([3, 4, 5, 9]))
    assert (now[1] != at_1[1]).all()                           # row 4 moved
    then = t.pull(np.array([3, 4, 5, 9]), step=1)
    np.testing.assert_array_equal(then[:3], at_1)              # as at version 1
    np.testing.assert_array_equal(then[3], initial_rows(4, "items", np.array([9]), 3, 0.1)[0])
    np.testing.assert_array_equal(t.pull(np.array([3, 4, 5, 9]), step=2), now)
    assert t.push(2, [3], 1, 1, np.empty(0, np.int64), np.empty((0, 3), np.float32))
    np.testing.assert_array_equal(t.pull(np.array([3, 4, 5, 9]), step=2), now)   # nothing changed
    with pytest.raises(Gone, match="version 1 is gone"):
        t.pull(np.array([3]), step=1)


def test_an_asp_table_applies_each_push_on_arrival_once():
    spec = check_spec({"name": "items", "dim": 3, "num_embeddings": 30, "init_std": 0.0,
                       "optimizer": {"name": "sgd", "lr": 1.0}})
    t = SparseTable(spec, 0, mode="asp")
    g = np.full((1, 3), 4.0, np.float32)
    assert t.push(5, [1], 2, 1, np.array([7]), g)               # any step: on arrival
    np.testing.assert_array_equal(t.pull(np.array([7])), [[-2.0, -2.0, -2.0]])   # mean of 2
    assert t.push(0, [2], 3, 1, np.empty(0, np.int64), np.empty((0, 3), np.float32))
    assert t.version == 2                                      # no row here, still an update
    assert not t.push(1, [1], 2, 1, np.array([7]), g)          # task 1 again
    assert t.push(1, [], 0, 1, np.empty(0, np.int64), np.empty((0, 3), np.float32))   # a tick
    assert t.version == 2 and t.duplicates_rejected == 1


def test_rows_unseen_for_k_steps_or_beyond_max_rows_are_evicted():
    def tbl(**evict):
        return SparseTable(check_spec({"name": "t", "dim": 2, "init_std": 0.1,
                                       "optimizer": {"name": "adagrad", "lr": 0.5}, **evict}), 0)
    t = tbl(evict_unseen_steps=3)
    for step in range(10):                   # id 1 every step, id 100 + step once
        ids = np.array([1, 100 + step])
        t.pull(ids)
        t.push(step, [step], 1, 1, ids, np.ones((2, 2), np.float32))
    kept, _ = t.dump()
    assert 1 in kept and 100 not in kept and t.evicted > 0
    assert set(kept) <= {1} | {100 + s for s in range(10 - 4, 10)}   # seen in the last 3-4 steps
    # an evicted row touched again starts over from its first value
    np.testing.assert_array_equal(t.pull(np.array([100])), initial_rows(0, "t", [100], 2, 0.1))
    t = tbl(max_rows=64)
    for step in range(40):                   # 8 new ids a step: 320 in all
        ids = np.arange(8 * step, 8 * step + 8)
        t.pull(ids)
        t.push(step, [step], 1, 1, ids, np.ones((8, 2), np.float32))
        assert len(t) <= 64 + 64 // 8 + 8
    kept, rows = t.dump()
    assert kept.min() >= 320 - 72 and t.evicted == 320 - len(t)   # the most recent survive
    assert (rows != initial_rows(0, "t", kept, 2, 0.1)).all()     # and keep their updates
    with pytest.raises(ValueError, match="max_rows"):
        tbl(max_rows=0)


def test_a_server_s_step_count_advances_when_none_of_its_rows_are_touched():
    # Adam's bias correction reads the table's step count, as torch's reads the weight's:
    # a server that got no row in steps 0-1 must still be at step 3 in step 2.
    t = table({"name": "adam", "lr": 0.1})
    for step in range(2):
        t.push(step, [step], 4, 1, np.empty(0, np.int64), np.empty((0, 3), np.float32))
    row0 = t.pull(np.array([7])).copy()
    t.push(2, [2], 1, 1, np.array([7]), np.ones((1, 3), np.float32))
    step_size = 0.1 * np.sqrt(1 - 0.999 ** 3) / (1 - 0.9 ** 3)
    m, v = 0.1, 0.001
    np.testing.assert_allclose(t.pull(np.array([7])), row0 - step_size * m / (np.sqrt(v) + 1e-8),
                               rtol=1e-5)


# -- the wire ---------------------------------------------------------------------------------------

def test_sparse_payloads_are_checked_before_use():
    ids = np.array([4, 9], np.int64)
    rows = np.ones((2, 3), np.float32)
    frames = transport.split(ids) + transport.split(rows.reshape(-1))
    got, g = validation.sparse_payload([bytes(f) for f in frames], 2, 3)
    np.testing.assert_array_equal(got, ids) and np.testing.assert_array_equal(g, rows)
    bad = [([bytes(transport.split(ids)[0])], 2, 3, Error.BAD_PAYLOAD),           # rows missing
           ([bytes(transport.split(np.array([4, 4]))[0]), rows.tobytes()], 2, 3, Error.BAD_PAYLOAD),
           ([ids.tobytes(), np.full(6, np.nan, np.float32).tobytes()], 2, 3, Error.NONFINITE),
           ([ids.tobytes()[:-1]], 2, None, Error.BAD_PAYLOAD),
           ([ids.tobytes(), b"x"], 2, None, Error.BAD_PAYLOAD)]
    for frames, n, dim, code in bad:
        with pytest.raises(ProtocolError) as exc:
            validation.sparse_payload(frames, n, dim)
        assert exc.value.code == code


def test_a_server_refuses_ids_it_does_not_hold_and_unknown_tables():
    spec = {"name": "items", "dim": 2, "num_embeddings": 1000, "init_std": 0.0,
            "optimizer": {"name": "sgd", "lr": 0.1}}
    tables = Tables([spec], 0, 0, 2)
    ids = np.arange(40, dtype=np.int64)
    mine, theirs = ids[server_of(ids, 2) == 0], ids[server_of(ids, 2) == 1]
    header = {"table": "items", "step": 0, "n": int(mine.size)}
    fields, frames = tables.pull(header, [mine.tobytes()])
    assert fields["n"] == mine.size and sum(memoryview(f).nbytes for f in frames) == mine.size * 8
    cases = [({"table": "items", "step": 0, "n": int(theirs.size)}, [theirs.tobytes()], Error.WRONG_SHARD),
             ({"table": "users", "step": 0, "n": 1}, [mine[:1].tobytes()], Error.BAD_FIELD),
             ({"table": "items", "step": 0, "n": 1}, [np.array([5000]).tobytes()], None),
             ({"table": "items", "step": 1, "n": 1}, [mine[:1].tobytes()], Error.NOT_READY)]
    for header, payload, code in cases:
        with pytest.raises(ProtocolError) as exc:
            tables.pull(header, payload)
        assert code is None or exc.value.code == code, exc.value
    assert len(tables.tables["items"]) == mine.size          # refusals created no row


def test_bad_table_specs_are_refused_with_their_reason():
    good = {"name": "items", "dim": 4, "optimizer": {"name": "adagrad", "lr": 0.1}}
    check_spec(good)
    for bad, words in [({"name": "a b"}, "name"), ({"dim": 0}, "dim"),
                       ({"num_embeddings": -1}, "num_embeddings"), ({"init_std": -1}, "init_std"),
                       ({"optimizer": {"name": "adamw"}}, "optimizer"),
                       ({"optimizer": {"name": "adagrad", "momentum": 0.9}}, "unknown"),
                       ({"optimizer": {"name": "adam", "betas": [0.9, 1.5]}}, "betas")]:
        with pytest.raises(ValueError, match=words):
            check_spec({**good, **bad})


# -- the cluster against single-process torch ------------------------------------------------------

def load_job():
    spec = importlib.util.spec_from_file_location("sparse_bag_job", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def reference(steps, env, seed=0):
    """Single-process torch on the same global batches: EmbeddingBag(sparse=True) from
    initial_rows with the table's torch optimizer, the dense layer with SGD."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        job = load_job()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    torch.manual_seed(seed)
    model = job.reference_model(seed)
    data = job.build_dataset()
    dense = torch.optim.SGD(model.head.parameters(), lr=job.OPTIMIZER["lr"])
    opt = job.TABLE_OPTIMIZER
    rows = TORCH_OPT[opt["name"]](model.items.parameters(),
                                  **{k: (tuple(v) if k == "betas" else v)
                                     for k, v in opt.items() if k != "name"})
    plan = TaskPlan(len(data), job.BATCH_SIZE, 1, seed=seed, shuffle=False)
    for step in range(steps):
        batch = data[[i for task in plan.tasks(step) for i in task.samples]]
        dense.zero_grad()
        rows.zero_grad()
        job.loss_fn(model, batch).backward()
        dense.step()
        rows.step()
    return model


def check(run, steps, env):
    assert run.rc == 0, run.stderr[-3000:]
    want = reference(steps, env)
    for name in ("head.weight", "head.bias"):
        np.testing.assert_allclose(run.params[name], want.state_dict()[name].numpy(), rtol=0, atol=1e-5)
    out = np.load(os.path.join(run.out, "sparse", "items.npz"))
    assert (np.diff(out["ids"]) > 0).all()
    weight = want.items.weight.detach().numpy()
    np.testing.assert_allclose(out["rows"], weight[out["ids"]], rtol=0, atol=1e-5)
    summary = run.summary
    assert summary["sparse"]["items"]["rows"] == out["ids"].size
    return summary


ADAGRAD = {"SPARSE_BAG_OPTIMIZER": json.dumps({"name": "adagrad", "lr": 0.1})}
ADAM = {"SPARSE_BAG_OPTIMIZER": json.dumps({"name": "adam", "lr": 0.05})}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("servers,workers,env", [
    (2, 2, ADAGRAD),
    pytest.param(1, 3, ADAM, marks=pytest.mark.slow),
    pytest.param(3, 1, ADAGRAD, marks=pytest.mark.slow),
    pytest.param(3, 3, ADAM, marks=pytest.mark.slow)])
def test_bsp_with_a_sparse_table_equals_single_process_torch(tmp_path, servers, workers, env):
    run = launch(tmp_path, "--job", JOB, "--servers", str(servers), "--workers", str(workers),
                 "--steps", "20", env=env)
    summary = check(run, 20, env)
    assert len(summary["sparse"]["items"]["per_server"]) == servers


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_straggler_s_stolen_tasks_push_their_rows_once(tmp_path):
    env = {**ADAM, "SPARSE_BAG_DELAY_S": "0.01"}
    run = launch(tmp_path, "--job", JOB, "--servers", "2", "--workers", "3", "--steps", "20",
                 "--slow", "1=4", "--tasks-per-step", "6", env=env)
    summary = check(run, 20, env)
    assert sum(w["stolen_by"] for w in summary["per_worker"]) > 0


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", ["before_push", "after_sparse_push"])
def test_a_worker_killed_at_its_push_loses_nothing(tmp_path, point):
    # Worker 1 dies at step 6, with the step's tasks computed: before any of its pushes,
    # or after its tables took the step's rows and before its dense shards got anything
    # (the tables complete step 6, the dense shards wait). The tasks are dealt again and
    # computed on version 6 (the tables answer a pull one step behind with the rows as
    # they were), the tables refuse rows they have, and the run still ends on
    # single-process torch. --no-steal: worker 1 surely holds tasks of step 6.
    env = {**ADAGRAD, "SPARSE_BAG_DELAY_S": "0.01"}
    run = launch(tmp_path, "--job", JOB, "--servers", "2", "--workers", "3", "--steps", "20",
                 "--tasks-per-step", "6", "--no-steal", "--crash-at", f"1:{point}@6",
                 "--dead-after-s", "1.5", env=env)
    summary = check(run, 20, env)
    assert len(summary["deaths"]) == 1 and "worker1 exited with status -9" in run.stderr
    refused = sum(t["duplicates_rejected"] for t in summary["sparse"]["items"]["per_server"])
    assert (refused >= 1) == (point == "after_sparse_push"), refused
    assert summary["duplicates_rejected"] == 0         # no dense shard had the step's tasks


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["ssp", pytest.param("asp", marks=pytest.mark.slow)])
def test_ssp_and_asp_apply_each_push_to_the_table_once(tmp_path, mode):
    env = {**ADAM, "SPARSE_BAG_DELAY_S": "0.005"}
    run = launch(tmp_path, "--job", JOB, "--mode", mode, "--servers", "2", "--workers", "3",
                 "--steps", "18", "--tasks-per-step", "6", "--slow", "1=3", env=env)
    assert run.rc == 0, run.stderr[-3000:]
    s = run.summary
    assert [e["samples_applied"] for e in s["per_epoch"]] == [200, 200]
    pushes = sum(w["pushes"] for w in s["per_worker"])
    # every push reached every server's table (an empty one where no id of it lives), and
    # each was applied once: a table's updates are the pushes
    assert [p["version"] for p in s["sparse"]["items"]["per_server"]] == [pushes, pushes]
    assert all(p["duplicates_rejected"] == 0 for p in s["sparse"]["items"]["per_server"])
    out = np.load(os.path.join(run.out, "sparse", "items.npz"))
    assert np.isfinite(out["rows"]).all() and out["ids"].size == s["sparse"]["items"]["rows"]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_checkpoint_keeps_the_tables_and_resumes_into_another_server_count(tmp_path):
    # 12 steps on 2 servers with a checkpoint every 6; then the run resumes from step 12
    # on 3 servers: each takes the rows of its virtual shards from both old files, with
    # their Adam moments and step count, and the run ends on single-process torch.
    ckpt = ["--checkpoint-every", "6", "--checkpoint-dir", str(tmp_path / "ckpt")]
    first = launch(tmp_path / "a", "--job", JOB, "--servers", "2", "--workers", "2",
                   "--steps", "12", *ckpt, env=ADAM)
    assert first.rc == 0, first.stderr[-3000:]
    run = launch(tmp_path / "b", "--job", JOB, "--servers", "3", "--workers", "2",
                 "--steps", "20", *ckpt, "--resume", env=ADAM)
    summary = check(run, 20, ADAM)
    assert summary["resumed_from"]["version"] == 12 and summary["servers"] == 3


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_lost_server_s_rows_come_back_from_the_checkpoint(tmp_path):
    env = {**ADAGRAD, "SPARSE_BAG_DELAY_S": "0.02"}
    run = launch(tmp_path, "--job", JOB, "--servers", "2", "--workers", "2", "--steps", "20",
                 "--checkpoint-every", "5", "--dead-after-s", "1.5", "--recover",
                 "--inject", "kill:server1@step=12", env=env)
    summary = check(run, 20, env)
    assert len(summary["recoveries"]) == 1


@pytest.mark.timeout(120)
def test_a_capped_table_evicts_and_says_so(tmp_path):
    env = {**ADAGRAD, "SPARSE_BAG_MAX_ROWS": "20"}
    run = launch(tmp_path, "--job", JOB, "--servers", "2", "--workers", "2", "--steps", "12",
                 env=env)
    assert run.rc == 0, run.stderr[-3000:]
    table = run.summary["sparse"]["items"]
    assert table["evicted"] > 0
    assert all(p["rows"] <= 10 + 10 // 8 + 3 * 24 for p in table["per_server"])   # share + a step
    out = np.load(os.path.join(run.out, "sparse", "items.npz"))
    assert out["ids"].size == table["rows"] < 60


def test_sparse_tables_refuse_diloco(tmp_path):
    run = launch(tmp_path, "--job", JOB, "--mode", "diloco", "--steps", "2")
    assert run.rc != 0 and "sparse tables need --mode bsp, ssp or asp" in run.stderr
