"""The model's parameters and gradients as two flat float32 buffers.

Every parameter becomes a view into one flat vector, and every ``.grad`` a view into
a second one, in ``named_parameters`` order (the layout ``ps.core.sharding`` cuts into
shards). What that buys:

* a pull lands directly in the model's storage (one copy, frame -> parameter);
* backward accumulates straight into the flat gradient (autograd adds into an
  existing ``.grad`` in place), so shard k's gradient is ``grads[lo:hi]``, a view
  ready to send with no gather copy.

On CUDA the parameters live on the device and the host side is a pinned buffer:
pulls land in pinned memory and go up with one asynchronous copy; gradients come
down the same way before a push (*staged* buffers). On the CPU host and device buffers
are the same tensor, unless ``staged=True`` asks for two: then the CUDA path's copies
(``after_pull``, ``grads_to_host``) run on a machine with no GPU, and the tests cover them.
"""
from __future__ import annotations

import numpy as np
import torch


class FlatModel:
    def __init__(self, model: torch.nn.Module, device: torch.device, staged: bool | None = None):
        named = list(model.named_parameters())
        bad = [n for n, p in named if p.dtype != torch.float32]
        if bad:
            raise ValueError(f"parameters must be float32; not: {', '.join(bad)}")
        self.layout = [(name, list(p.shape)) for name, p in named]
        total = sum(p.numel() for _, p in named)
        self.device = device
        self.staged = device.type == "cuda" if staged is None else staged   # two buffers each
        pinned = device.type == "cuda"      # pinned host memory: asynchronous copies to the GPU
        self.host_params = torch.empty(total, dtype=torch.float32, pin_memory=pinned)  # (total,)
        self.host_grads = torch.zeros(total, dtype=torch.float32, pin_memory=pinned)   # (total,)
        if self.staged:
            self.params = torch.empty(total, dtype=torch.float32, device=device)
            self.grads = torch.zeros(total, dtype=torch.float32, device=device)
        else:
            self.params, self.grads = self.host_params, self.host_grads
        offset = 0
        with torch.no_grad():
            for _, p in named:
                n = p.numel()
                self.params[offset:offset + n].copy_(p.detach().reshape(-1))
                p.data = self.params[offset:offset + n].view_as(p)
                p.grad = self.grads[offset:offset + n].view_as(p)
                offset += n
        self.named = named
        if self.staged:
            self.host_params.copy_(self.params)
        # numpy views of the host buffers: what the shard client reads and writes
        self.params_np: np.ndarray = self.host_params.numpy()   # (total,) float32
        self.grads_np: np.ndarray = self.host_grads.numpy()     # (total,) float32

    def after_pull(self) -> None:
        """Make freshly pulled host parameters visible to the model."""
        if self.staged:
            self.params.copy_(self.host_params, non_blocking=True)

    def zero_grad(self) -> None:
        self.grads.zero_()

    def grads_to_host(self) -> None:
        """Make the gradient sum readable from ``grads_np`` (a no-op with one buffer)."""
        if self.staged:
            self.host_grads.copy_(self.grads, non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()

    def check_grads_in_place(self) -> None:
        """Every ``.grad`` must still be our view, or backward would accumulate into a
        tensor of its own and the push would send the flat buffer without it (a job's
        ``loss_fn`` calling ``model.zero_grad()``, which sets ``.grad`` to None, does
        that). Raises RuntimeError naming the first parameter that left. It cannot see a
        ``zero_grad(set_to_none=False)``, which zeroes our buffer in place. A tensor with
        no elements has no address (``data_ptr()`` is 0): only its presence is checked."""
        start, end = self.grads.data_ptr(), self.grads.data_ptr() + self.grads.numel() * 4
        for name, p in self.named:
            if p.grad is None or (p.numel() and not start <= p.grad.data_ptr() < end):
                raise RuntimeError(f"the gradient of {name} is no longer in the flat buffer: "
                                   "a job's loss_fn must not set or reset .grad "
                                   "(model.zero_grad() sets it to None)")

    def named_arrays(self) -> dict[str, np.ndarray]:
        """Host parameters by name, shaped as in the model's state_dict (views)."""
        out, offset = {}, 0
        for name, shape in self.layout:
            n = int(np.prod(shape)) if shape else 1
            out[name] = self.params_np[offset:offset + n].reshape(shape)
            offset += n
        return out
