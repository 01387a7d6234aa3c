"""GPU workers (skipped without CUDA; `scripts/gpu_check.sh` runs these where a GPU exists).

A worker on CUDA keeps its parameters on the device and pulls into pinned host
memory; the BSP oracle must hold exactly as on the CPU (to the same 1e-5).
"""
import json
import os

import pytest
import torch

from cluster import EXAMPLES, JOBS, assert_params_close, launch, oracle

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_flat_model_on_cuda_uses_pinned_host_buffers():
    import sys
    from cluster import ROOT
    sys.path.insert(0, ROOT)
    from worker.flat import FlatModel
    model = torch.nn.Linear(4, 3).cuda()
    flat = FlatModel(model, torch.device("cuda"))
    assert flat.host_params.is_pinned() and flat.params.is_cuda
    assert model.weight.data_ptr() == flat.params.data_ptr()


def test_bsp_cuda_workers_equal_the_oracle(tmp_path):
    steps = 60
    job = os.path.join(JOBS, "tiny_mlp.py")
    opt = {"name": "adam", "lr": 0.01}
    os.environ["TINY_MLP_OPTIMIZER"] = json.dumps(opt)
    try:
        want = oracle(job, steps)
    finally:
        del os.environ["TINY_MLP_OPTIMIZER"]
    run = launch(tmp_path, "--job", job, "--device", "cuda", "--steps", str(steps),
                 env={"TINY_MLP_OPTIMIZER": json.dumps(opt)})
    assert run.rc == 0, run.stderr[-3000:]
    # CUDA kernels may sum in another order than the CPU: allow a little more than on the CPU
    assert_params_close(run.params, want, rtol=1e-4)


def test_mlp_example_on_cuda(tmp_path):
    run = launch(tmp_path, "--job", os.path.join(EXAMPLES, "mlp_classifier.py"), "--device", "cuda",
                 "--steps", "50")
    assert run.rc == 0, run.stderr[-3000:]
