"""The oracle: a BSP cluster computes exactly what single-process torch computes.

For every combination of 1-3 workers and 1-3 servers, with SGD-with-momentum and
with Adam, 60 BSP steps on the cluster end with the parameters of 60 torch
optimizer steps on the same global batches (SHUFFLE = False), to a relative 1e-5.
60 steps of 24 samples over 200 samples also crosses epoch boundaries and a short
last batch (200 = 8 x 24 + 8).
"""
import json
import os

import pytest

from cluster import JOBS, assert_params_close, launch, oracle

STEPS = 60
JOB = os.path.join(JOBS, "tiny_mlp.py")
OPTIMIZERS = {
    "sgd_momentum": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "adam": {"name": "adam", "lr": 0.01},
}


@pytest.fixture(scope="module")
def reference(request):
    cache = {}

    def get(opt_name):
        if opt_name not in cache:
            os.environ["TINY_MLP_OPTIMIZER"] = json.dumps(OPTIMIZERS[opt_name])
            try:
                cache[opt_name] = oracle(JOB, STEPS)
            finally:
                del os.environ["TINY_MLP_OPTIMIZER"]
        return cache[opt_name]
    return get


@pytest.mark.timeout(120)
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("workers,servers", [(w, s) for w in (1, 2, 3) for s in (1, 2, 3)])
def test_bsp_cluster_equals_single_process_torch(tmp_path, reference, opt_name, workers, servers):
    run = launch(tmp_path, "--job", JOB, "--workers", str(workers), "--servers", str(servers),
                 "--mode", "bsp", "--steps", str(STEPS),
                 env={"TINY_MLP_OPTIMIZER": json.dumps(OPTIMIZERS[opt_name])})
    assert run.rc == 0, run.stderr[-3000:]
    summary = run.summary
    assert summary["steps"] == STEPS
    assert summary["samples"] == 6 * 200 + 6 * 24      # 6 whole epochs of 9 steps, then 6 steps
    assert summary["duplicates_rejected"] == 0
    assert_params_close(run.params, reference(opt_name), rtol=1e-5)
