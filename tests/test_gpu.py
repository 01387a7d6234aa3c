"""GPU workers (skipped without CUDA; ``scripts/gpu_check.sh`` runs these where a GPU exists).

A worker on CUDA keeps its parameters on the device and pulls into pinned host memory
(``worker/flat.py``'s staged buffers; their copies also run on the CPU in test_flat.py and
with ``--staged-buffers`` in test_oracle.py). On CUDA the BSP oracle holds to CUDA_RTOL, not
the CPU's 1e-5: cuBLAS sums in another order than the CPU's kernels, so every gradient
differs in its last bits and Adam carries that into the parameters. Each oracle test
prints the largest relative deviation it saw, which gpu_check.sh reports, so the bar can
be set from a measurement.
"""
import json
import os

import pytest
import torch

from cluster import EXAMPLES, JOBS, assert_params_close, launch, oracle

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = 60
JOB = os.path.join(JOBS, "tiny_mlp.py")
CUDA_RTOL = 1e-4
OPTIMIZERS = {"sgd_momentum": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
              "adam": {"name": "adam", "lr": 0.01}}


def max_relative_deviation(got: dict, want: dict) -> float:
    return max(float(abs(got[k] - want[k]).max() / max(abs(want[k]).max(), 1e-12)) for k in want)


def test_flat_model_on_cuda_uses_pinned_host_buffers():
    from worker.flat import FlatModel
    model = torch.nn.Linear(4, 3).cuda()
    flat = FlatModel(model, torch.device("cuda"))
    assert flat.staged and flat.host_params.is_pinned() and flat.params.is_cuda
    assert model.weight.data_ptr() == flat.params.data_ptr()
    flat.params_np[:] = 1.0
    flat.after_pull()
    assert torch.equal(model.weight.cpu(), torch.ones(3, 4))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("workers,servers", [(1, 1), (2, 2), (3, 2)])
def test_bsp_cuda_workers_equal_the_oracle(tmp_path, opt_name, workers, servers):
    env = {"TINY_MLP_OPTIMIZER": json.dumps(OPTIMIZERS[opt_name])}
    want = oracle(JOB, STEPS, env=env)                     # single-process torch on the CPU
    run = launch(tmp_path, "--job", JOB, "--device", "cuda", "--steps", str(STEPS),
                 "--workers", str(workers), "--servers", str(servers), env=env)
    assert run.rc == 0, run.stderr[-3000:]
    print(f"cuda oracle {opt_name} {workers}x{servers}: max relative deviation "
          f"{max_relative_deviation(run.params, want):.2e} (bar {CUDA_RTOL:g})")
    assert run.summary["duplicates_rejected"] == 0
    assert_params_close(run.params, want, rtol=CUDA_RTOL)


def test_mlp_example_on_cuda_learns(tmp_path):
    run = launch(tmp_path, "--job", os.path.join(EXAMPLES, "mlp_classifier.py"),
                 "--device", "cuda", "--steps", "640")
    assert run.rc == 0, run.stderr[-3000:]
    accuracy = float(run.stdout.split("accuracy ")[1].split("%")[0])
    assert accuracy > 90.0, run.stdout                      # chance is 20%


def test_char_transformer_on_cuda_learns(tmp_path):
    run = launch(tmp_path, "--job", os.path.join(EXAMPLES, "char_transformer.py"),
                 "--device", "cuda", "--steps", "150")
    assert run.rc == 0, run.stderr[-3000:]
    losses = run.summary["losses"]
    assert losses[-1] < 0.8 * losses[0], losses[::10]
