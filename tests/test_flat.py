"""The flat buffers (worker/flat.py): one copy in, no gather out, and the staged copies.

With ``staged=True`` the CPU gets the layout CUDA has (parameters and gradients in one pair
of buffers, the host side in another), so the copies between them, ``after_pull`` and
``grads_to_host``, run here without a GPU.
"""
import numpy as np
import torch

from worker.flat import FlatModel


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def backward(m):
    m(torch.ones(5, 3)).sum().backward()


def test_one_buffer_on_the_cpu_by_default():
    m = model()
    flat = FlatModel(m, torch.device("cpu"))
    assert not flat.staged and flat.params is flat.host_params
    assert m[0].weight.data_ptr() == flat.params.data_ptr()
    flat.params_np[:] = 1.0                                  # a pull lands in the model at once
    assert torch.equal(m[0].weight, torch.ones(4, 3))
    backward(m)
    assert np.array_equal(flat.grads_np[:12], m[0].weight.grad.reshape(-1).numpy())


def test_staged_buffers_copy_in_after_a_pull_and_out_before_a_push():
    m = model()
    start = torch.cat([p.detach().reshape(-1).clone() for p in m.parameters()])
    flat = FlatModel(m, torch.device("cpu"), staged=True)
    assert flat.staged and flat.params.data_ptr() != flat.host_params.data_ptr()
    assert np.array_equal(flat.params_np, start.numpy())     # the host copy starts equal
    assert m[0].weight.data_ptr() == flat.params.data_ptr()  # the model reads the device side

    flat.params_np[:] = 2.0                                  # a pull into the host buffer ...
    assert not torch.equal(m[0].weight, torch.full((4, 3), 2.0))   # ... is not seen yet
    flat.after_pull()
    assert torch.equal(m[0].weight, torch.full((4, 3), 2.0))

    backward(m)
    assert not flat.grads_np.any()                           # the host side is stale ...
    flat.grads_to_host()
    assert np.array_equal(flat.grads_np, flat.grads.numpy()) and flat.grads_np.any()
    flat.zero_grad()
    flat.check_grads_in_place()                              # .grad still views the device side
