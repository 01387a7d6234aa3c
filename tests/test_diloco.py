"""DiLoCo (``--mode diloco --inner-steps H``): H local steps a round, one outer step.

Each worker takes H inner steps (torch's optimizer, the job's OPTIMIZER) on its part of
each global batch, then pushes its pseudo-gradient ``n_k (θ_r - θ_k)``; the shards, BSP
shards whose versions are rounds, average them by samples and take one step of the outer
optimizer (Nesterov SGD). The oracle is ``worker.reference.train_diloco``: M model copies
in one process, each with its own inner optimizer, and ``torch.optim.SGD(nesterov=True)``
as the outer step. In-process: the dealer's rounds and parts. Cluster: 1-3 servers x 1-3
workers against the oracle (a short last round included), the recipe (groups, schedule,
clipping) as the inner optimizer, the bytes moved (H times fewer than BSP), and a worker
killed mid-round.
"""
import json
import os

import numpy as np
import pytest

from cluster import JOBS, assert_params_close, launch, oracle
from ps.core.dealer import Dealer
from ps.core.tasks import TaskPlan
from worker import reference

JOB = os.path.join(JOBS, "tiny_mlp.py")
STEPS, H = 18, 4                 # 5 rounds, the last of 2 steps
ADAMW = {"TINY_MLP_OPTIMIZER": json.dumps({"name": "adamw", "lr": 0.01})}


# -- the dealer: rounds of H steps, part j of each step to worker j -------------------------

def test_a_round_is_h_steps_and_worker_j_gets_part_j_of_each():
    plan = TaskPlan(200, 24, 3, seed=0, shuffle=False)        # 9 steps an epoch, 3 parts each
    dealer = Dealer(plan, 3, STEPS, steal=False, steps_per_round=H)
    assert dealer.rounds == 5 and list(dealer.steps_of(4)) == [16, 17]
    dealer.deal(0)
    for worker in range(3):
        tasks = list(dealer.deques[0][worker])
        assert [t.step for t in tasks] == [0, 1, 2, 3]
        assert all(t.id % 3 == worker for t in tasks)           # its own part of every step
        assert tasks[0].samples == tuple(range(8 * worker, 8 * worker + 8))
    assert dealer.round_tasks(0) == 12 and dealer.round_tasks(4) == 6
    # step 8 is an epoch's last, of 8 samples: still 3 parts, of 3, 3 and 2
    dealer.deal(2)
    assert [len(dealer.deques[2][w][0].samples) for w in range(3)] == [3, 3, 2]


def test_a_dead_worker_s_parts_go_to_the_live_ones():
    plan = TaskPlan(200, 24, 3, seed=0, shuffle=False)
    dealer = Dealer(plan, 3, STEPS, steal=False, steps_per_round=H)
    dealer.gone.add(1)
    dealer.deal(0)
    assert len(dealer.deques[0][1]) == 0
    assert sorted(len(dealer.deques[0][w]) for w in (0, 2)) == [4, 8]


# -- the cluster against the single-process simulation --------------------------------------

def diloco_oracle(env, workers, steps=STEPS, inner=H):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        model, _ = reference.train_diloco(JOB, steps, inner, workers)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


def run_diloco(out, workers, servers, env=ADAMW, *flags, steps=STEPS, inner=H):
    run = launch(out, "--job", JOB, "--mode", "diloco", "--inner-steps", str(inner),
                 "--workers", str(workers), "--servers", str(servers), "--steps", str(steps),
                 *flags, env=env)
    assert run.rc == 0, run.stderr[-3000:]
    return run


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers,servers", [(2, 2), pytest.param(3, 1, marks=pytest.mark.slow),
                                             pytest.param(1, 3, marks=pytest.mark.slow)])
def test_sync_diloco_equals_the_single_process_simulation(tmp_path, workers, servers):
    run = run_diloco(tmp_path, workers, servers)
    assert_params_close(run.params, diloco_oracle(ADAMW, workers), rtol=1e-5)
    summary = run.summary
    assert (summary["mode"], summary["steps"], summary["rounds"], summary["inner_steps"]) == \
        ("diloco", STEPS, 5, H)
    assert [e["samples_applied"] for e in summary["per_epoch"]] == [200, 200]
    assert len(summary["losses"]) == 5                          # one mean loss a round
    # it is not BSP: the same steps in BSP end elsewhere
    bsp = oracle(JOB, STEPS, env=ADAMW)
    assert any(not np.allclose(run.params[k], bsp[k], rtol=1e-3) for k in bsp)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_inner_optimizer_takes_the_whole_recipe(tmp_path):
    env = {**ADAMW, "TINY_MLP_GROUPS": json.dumps({"decay": {"weight_decay": 0.1},
                                                   "nodecay": {"weight_decay": 0.0, "lr": 0.005}}),
           "TINY_MLP_SCHEDULE": "[3, 15, 0.1]", "TINY_MLP_CLIP": "0.6"}
    run = run_diloco(tmp_path, 2, 2, env)
    assert_params_close(run.params, diloco_oracle(env, 2), rtol=1e-5)
    assert run.summary["clipped_steps"] == 0        # the shards clip nothing: the workers do


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_diloco_moves_h_times_fewer_bytes_than_bsp(tmp_path):
    diloco = run_diloco(tmp_path / "diloco", 2, 2, steps=16, inner=8)
    bsp = launch(tmp_path / "bsp", "--job", JOB, "--workers", "2", "--servers", "2",
                 "--steps", "16", "--tasks-per-step", "2", "--no-steal", env=ADAMW)
    assert bsp.rc == 0, bsp.stderr[-3000:]
    params = sum(v.size for v in bsp.params.values())
    for summary in (diloco.summary, bsp.summary):
        assert summary["bytes_pushed"] == sum(w["bytes_pushed"] for w in summary["per_worker"])
    # BSP: each worker pushes its gradient and pulls the model every step (and the
    # finisher the final parameters); DiLoCo the same, once a round of 8 steps.
    assert bsp.summary["bytes_pushed"] == 2 * 16 * 4 * params
    assert diloco.summary["bytes_pushed"] == 2 * 2 * 4 * params
    assert bsp.summary["bytes_pulled"] == (2 * 16 + 1) * 4 * params
    assert diloco.summary["bytes_pulled"] == (2 * 2 + 1) * 4 * params
    moved = [s["bytes_pushed"] + s["bytes_pulled"] for s in (bsp.summary, diloco.summary)]
    assert moved[0] / moved[1] >= 8 / 1.2


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_worker_killed_mid_round_loses_only_its_round_and_is_replaced(tmp_path):
    # Worker 1 dies in round 2; its parts of that round are trained by the live worker
    # from θ_2 with a fresh inner optimizer, so the run goes on, every sample applied once,
    # near (not at) the fault-free result. --respawn starts another worker 1: it registers
    # with a new incarnation at the round the live worker is on, pulls that round's θ and
    # trains its parts of the rounds dealt from then on, with a fresh inner optimizer.
    env = {**ADAMW, "TINY_MLP_DELAY_S": "0.05"}
    run = run_diloco(tmp_path, 2, 2, env, "--inject", "kill:worker1@step=2", "--respawn",
                     "--dead-after-s", "1.5", steps=96)
    summary = run.summary
    assert len(summary["deaths"]) == 1 and summary["deaths"][0]["worker"] == 1
    assert all(np.isfinite(v).all() for v in run.params.values())
    (rejoin,) = summary["rejoins"]
    assert rejoin["worker"] == 1 and 2 <= rejoin["start_step"] < 24
    assert summary["per_worker"][1]["step"] > rejoin["start_step"]     # it pushed rounds
    assert sum(e["samples_applied"] for e in summary["per_epoch"]) == 96 * 24 - 96 // 9 * 16
    assert all(e["duplicates_rejected"] == 0 for e in summary["per_epoch"])


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_scheduler_restarted_mid_run_changes_nothing(tmp_path):
    # Killed with round 3's first report journaled but unanswered: the restarted scheduler
    # replays its journal, the members register again, the round's unreported parts are
    # dealt again; the parts already pushed are refused by the shards, so the run ends on
    # the simulation's parameters.
    env = {**ADAMW, "TINY_MLP_DELAY_S": "0.02"}
    run = run_diloco(tmp_path, 2, 2, env, "--scheduler-crash-at", "report@3",
                     "--dead-after-s", "1.5", steps=36)
    (restart,) = run.summary["scheduler_restarts"]
    assert restart["members_back"] == 4
    assert_params_close(run.params, diloco_oracle(ADAMW, 2, steps=36), rtol=1e-5)
