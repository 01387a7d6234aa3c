"""The oracle: a BSP cluster computes exactly what single-process torch computes.

For every combination of 1-3 workers and 1-3 servers, with SGD-with-momentum or with
Adam (in turn, so that each optimizer meets 1, 2 and 3 workers and 1, 2 and 3
servers; ``ps/core/optim.py`` itself is checked against torch.optim in-process, in
``test_optim.py``), 60 BSP steps on the cluster end with the parameters of 60 torch
optimizer steps on the same global batches (SHUFFLE = False), to a relative 1e-5.
60 steps of 24 samples over 200 samples also crosses epoch boundaries and a short
last batch (200 = 8 x 24 + 8). Three of the 9 runs are in the fast tier
(``scripts/run_tests.sh --fast``); the rest are marked ``slow``.
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
            cache[opt_name] = oracle(JOB, STEPS,
                                     env={"TINY_MLP_OPTIMIZER": json.dumps(OPTIMIZERS[opt_name])})
        return cache[opt_name]
    return get


FAST = {(3, 2, "sgd_momentum"), (2, 3, "sgd_momentum"), (1, 1, "adam")}   # the fast tier's three


def grid():
    """1-3 workers x 1-3 servers, the optimizers in turn like a checkerboard's colours (each
    optimizer meets every worker and every server count); all but FAST in the slow tier."""
    names = sorted(OPTIMIZERS)
    for w in (1, 2, 3):
        for s in (1, 2, 3):
            opt_name = names[(w + s) % len(names)]
            marks = () if (w, s, opt_name) in FAST else (pytest.mark.slow,)
            yield pytest.param(opt_name, w, s, marks=marks, id=f"{w}-{s}-{opt_name}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("opt_name,workers,servers", grid())
def test_bsp_cluster_equals_single_process_torch(tmp_path, reference, opt_name, workers, servers,
                                                 flags=()):
    run = launch(tmp_path, "--job", JOB, "--workers", str(workers), "--servers", str(servers),
                 "--mode", "bsp", "--steps", str(STEPS), *flags,
                 env={"TINY_MLP_OPTIMIZER": json.dumps(OPTIMIZERS[opt_name])})
    assert run.rc == 0, run.stderr[-3000:]
    summary = run.summary
    assert summary["steps"] == STEPS
    assert summary["samples"] == 6 * 200 + 6 * 24      # 6 whole epochs of 9 steps, then 6 steps
    assert summary["duplicates_rejected"] == 0
    assert_params_close(run.params, reference(opt_name), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_staged_buffers_run_the_cuda_copy_path_and_equal_the_oracle(tmp_path, reference):
    # Separate host and device buffers on the CPU (worker/flat.py): every pull goes through
    # after_pull's copy and every push through grads_to_host's, as on CUDA.
    test_bsp_cluster_equals_single_process_torch(tmp_path, reference, "adam", 2, 2,
                                                 flags=("--staged-buffers",))
