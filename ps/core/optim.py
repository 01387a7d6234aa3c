"""Server-side optimizers: apply a pushed gradient to a shard's parameters, in place.

A server owns one shard: a flat (n,) float32 array of parameters. When the gradient for a
step arrives, the server calls ``opt.step(params, grad)`` and the shard's parameters move
in place; nothing is returned. The optimizer keeps its own state (momentum, Adam moments)
in arrays preallocated for exactly n elements, and hands it out by name for checkpoints.
The update runs in chunks of ``CHUNK`` elements, so its scratch space is a constant, not a
multiple of the shard.

    opt = make_optimizer({"name": "adam", "lr": 1e-3}, size=params.size)
    opt.step(params, grad)          # params: (n,) float32, writable; grad: (n,) float32
    opt.step(params, sums, divide_by=samples, keep=sums)   # BSP: mean of a sum; the old
                                    # parameters left in the sum's buffer (ps.core.shard)
    opt.step(params, frames, divide_by=samples)   # grad as pieces: the received frames
    opt.set_lr(lr_at[version])      # a schedule: the next step's learning rate
    opt.step(params, sums, divide_by=samples, scale=clip_coef)   # a clipped mean
    snapshot = opt.state()          # {"step": 1, "exp_avg": (n,), "exp_avg_sq": (n,)}
    opt.load_state(snapshot)        # e.g. after a restart, before the next step

Invariants:
- Numerically this is torch.optim's single-tensor CPU code path (``_single_tensor_sgd``,
  ``_single_tensor_adam``): same operations in the same order, hyperparameters rounded to
  float32 where torch rounds them. Torch fuses ``a + s*b`` into one FMA where numpy rounds
  twice, so results agree to about one float32 ulp per step, not bit for bit.
- Chunking changes no result: every operation is element-wise, so each element sees the
  same operations in the same order whatever the chunk size (tests compare bit for bit).
- ``grad`` is never written (it may be a read-only view straight into a zmq frame, or a
  list of them: pieces in order, together n floats), unless the caller passes the same
  array as ``keep``.
- The config uses torch's argument names and defaults (except: sgd requires lr).
"""

import numpy as np

F32 = np.float32
CHUNK = 1 << 15     # elements per pass of the update. A pass touches 4-6 arrays (params,
                    # gradient, state, two scratch chunks): 32Ki floats keeps them all
                    # (~800 KB) in a core's L2 between its ~10 operations, where whole-shard
                    # passes stream every array from memory once per operation. Measured
                    # in Optimizer.__init__; 16Ki-64Ki are within noise of each other.


def _f32(x: float) -> np.float32:
    # Torch casts a Python-float hyperparameter to the tensor's dtype before the kernel
    # runs; doing the same keeps numpy from computing in float64 and rounding afterwards.
    return F32(x)


def _lerp_(start: np.ndarray, end: np.ndarray, weight: float, tmp: np.ndarray) -> None:
    """start = lerp(start, end, weight), in place, with torch's two-sided formula."""
    # Torch picks the formula by the weight's size (ATen/native/Lerp.h) so that weight 0
    # gives `start` and weight 1 gives `end` exactly: with beta1 = 0, m is the gradient
    # bit for bit. One formula for all weights would be off by an ulp there.
    w = _f32(weight)
    np.subtract(end, start, out=tmp)                  # (n,) end - start
    if abs(w) < 0.5:
        np.multiply(tmp, w, out=tmp)
        np.add(start, tmp, out=start)                 # start + w * (end - start)
    else:
        np.multiply(tmp, F32(1) - w, out=tmp)
        np.subtract(end, tmp, out=start)              # end - (end - start) * (1 - w)


def _add_scaled_(dst: np.ndarray, src: np.ndarray, alpha: float, tmp: np.ndarray) -> None:
    """dst += alpha * src (torch's ``dst.add_(src, alpha=alpha)``); tmp may alias src."""
    np.multiply(src, _f32(alpha), out=tmp)
    np.add(dst, tmp, out=dst)


class Optimizer:
    """Base: argument checks, the step count, the chunk loop, scratch and named state.

    A subclass fills ``self._buffers`` (name -> (n,) float32 state array), sets
    ``self._l2`` (the weight decay folded into the gradient) and ``self.maximize``, and
    implements ``_update(p, g, lo, hi, step)``: one chunk, where ``p`` is
    ``params[lo:hi]``, ``g`` the chunk's effective gradient (read-only), and ``step``
    counts from 1 like torch's.
    """

    def __init__(self, size: int, chunk: int = CHUNK):
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 0:
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        if not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise ValueError(f"chunk must be a positive int, got {chunk!r}")
        self.size, self.chunk = int(size), int(chunk)
        self._step = 0
        self._buffers: dict[str, np.ndarray] = {}
        self._l2, self.maximize = 0.0, False
        # Two scratch chunks, reused by every pass, instead of the 3-4 full-size
        # temporaries per step that plain numpy expressions (p - lr * m / (sqrt(v) + eps))
        # allocate, or two full-size scratch buffers (this code before chunking: 2 bytes
        # of server memory per parameter byte). Measured for a BSP step (mean over the
        # samples, keep the previous version, update), one core of a 2-core Xeon with
        # 2 MB of L2 per core, best of 15: Adam on 4M elements 21 ms with whole-shard
        # passes, 13.5 ms in chunks of 32Ki; on 25M 175 ms and 90 ms; SGD with momentum
        # on 25M 87 ms and 49 ms. Results bit for bit the same.
        n = min(self.size, self.chunk)
        self._g = np.empty(n, F32)                    # (chunk,) effective gradient / numerator
        self._tmp = np.empty(n, F32)                  # (chunk,) products, denominators

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps (a schedule's, ``ps.core.shard``): what
        torch's LR schedulers do when they write a group's ``lr``."""
        self.lr = lr

    def step(self, params: np.ndarray, grad: np.ndarray | list[np.ndarray], divide_by: int = 1,
             keep: np.ndarray | None = None, scale: float = 1.0) -> None:
        """Apply ``grad / divide_by * scale`` to ``params`` in place (``scale``: a clipping
        coefficient, float32, applied to the mean as ``clip_grad_norm_`` multiplies it).

        ``grad``: an (n,) array, or a list of 1-D pieces that together make one (a push's
        frames, read where they arrived: no copy into a buffer first). It is only read,
        unless it is also ``keep``. ``keep``: an (n,) array that receives the parameters
        as they were before this step; it may be ``grad`` itself (the BSP shard keeps its
        previous version in its aggregation buffer this way): each chunk of it is written
        only once that chunk's gradient has been read.
        """
        self._check("params", params)
        pieces = self._pieces(grad)
        if not params.flags.writeable:
            raise ValueError("params must be writable: the update is applied in place")
        if keep is not None:
            self._check("keep", keep)
            if not keep.flags.writeable:
                raise ValueError("keep must be writable: it receives the old parameters")
        self._step += 1
        # The gradient is copied into scratch when it must be divided or its buffer
        # takes the old parameters (copying is exact, so the result does not change).
        copy = divide_by != 1 or scale != 1 or (
            keep is not None and any(np.may_share_memory(keep, g) for g in pieces))
        start = 0
        for piece in pieces:
            for i in range(0, piece.size, self.chunk):     # chunks never span two pieces
                lo, hi = start + i, start + min(i + self.chunk, piece.size)
                p = params[lo:hi]                          # (chunk,) view into the shard
                g = self._effective_grad(p, piece[i:i + self.chunk], divide_by, copy, scale)
                if keep is not None:
                    np.copyto(keep[lo:hi], p)              # the chunk's gradient is in g now
                self._update(p, g, lo, hi, self._step)
            start += piece.size

    def state(self) -> dict[str, np.ndarray | int]:
        """A snapshot (copies) of the named state: safe to write out while steps go on."""
        return {"step": self._step, **{k: v.copy() for k, v in self._buffers.items()}}

    def state_bytes(self) -> dict[str, int]:
        """Bytes held, by array: the named state, and ``scratch`` (a constant per shard)."""
        return {**{k: v.nbytes for k, v in self._buffers.items()},
                "scratch": self._g.nbytes + self._tmp.nbytes}

    def load_state(self, state: dict) -> None:
        """Restore a snapshot from ``state()``; the next step continues exactly from it."""
        expected = {"step", *self._buffers}
        if set(state) != expected:
            raise ValueError(f"state keys {sorted(state)} != expected {sorted(expected)}")
        step = state["step"]
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"state 'step' must be a non-negative int, got {step!r}")
        for name, buf in self._buffers.items():
            value = np.asarray(state[name])
            if value.shape != buf.shape:
                raise ValueError(f"state {name!r} has shape {value.shape}, need {buf.shape}")
            np.copyto(buf, value, casting="same_kind")
        self._step = int(step)

    def _check(self, name: str, a: np.ndarray) -> None:
        if not isinstance(a, np.ndarray) or a.dtype != F32 or a.shape != (self.size,):
            got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{name} must be a ({self.size},) float32 array, got {got}")

    def _pieces(self, grad) -> list[np.ndarray]:
        """``grad`` as a list of 1-D float32 pieces totalling n floats, or ValueError."""
        if isinstance(grad, np.ndarray):
            self._check("grad", grad)
            return [grad]
        if not (isinstance(grad, list) and all(isinstance(g, np.ndarray) and g.dtype == F32
                                               and g.ndim == 1 for g in grad)
                and sum(g.size for g in grad) == self.size):
            raise ValueError(f"grad must be a ({self.size},) float32 array or a list of 1-D "
                             f"float32 pieces of {self.size} floats in all")
        return grad

    def _effective_grad(self, p, grad, divide_by: int, copy: bool, scale: float = 1.0):
        """torch's ``g = -grad if maximize else grad; g = g + weight_decay * params``, for
        one chunk, after ``grad / divide_by`` (the shard's mean over samples) and ``* scale``
        (a clipping coefficient: torch multiplies the mean gradient in place by it)."""
        if not (copy or self._l2 or self.maximize):
            return grad                               # read-only: use as is, no copy
        g, n = self._g[:p.size], p.size
        if copy:
            grad = np.divide(grad, divide_by, out=g)  # exactly the shard's old in-place mean
            if scale != 1:
                np.multiply(g, F32(scale), out=g)
        if self._l2 == 0:
            return np.negative(grad, out=g) if self.maximize else grad
        # wd*p + grad and wd*p - grad round exactly like torch's (+-grad) + wd*p:
        # negation is exact and float addition commutes.
        decay = np.multiply(p, _f32(self._l2), out=self._tmp[:n])
        return (np.subtract if self.maximize else np.add)(decay, grad, out=g)

    def _update(self, p: np.ndarray, g: np.ndarray, lo: int, hi: int, step: int) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """torch.optim.SGD: optional momentum (heavy-ball or Nesterov), L2 decay, maximize."""

    def __init__(self, size, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, maximize=False, chunk=CHUNK):
        super().__init__(size, chunk)
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay, self.nesterov, self.maximize = weight_decay, nesterov, maximize
        self._l2 = weight_decay
        if momentum != 0:
            self._buffers["momentum_buffer"] = np.zeros(self.size, F32)

    def _update(self, p, g, lo, hi, step):
        tmp = self._tmp[:hi - lo]
        if self.momentum != 0:
            g = self._momentum(g, self._buffers["momentum_buffer"][lo:hi], tmp, step)
        _add_scaled_(p, g, -self.lr, tmp)             # params += -lr * g

    def _momentum(self, g, buf, tmp, step):
        if step == 1:
            # torch starts the buffer as a clone of the first gradient, not 0 * m + (1-d) g:
            # no dampening on step 1. The step count (not a None buffer) records this, so
            # it survives state()/load_state().
            np.copyto(buf, g)
        else:
            np.multiply(buf, _f32(self.momentum), out=buf)
            _add_scaled_(buf, g, 1 - self.dampening, tmp)
        if not self.nesterov:
            return buf
        # Nesterov looks ahead along the buffer: g + momentum * buf.
        np.multiply(buf, _f32(self.momentum), out=tmp)
        return np.add(g, tmp, out=tmp)


class DelayedSGD(Optimizer):
    """SGD whose momentum is applied once every ``every`` steps: async DiLoCo's outer
    step ("Delayed Nesterov", Liu et al. 2024), where each step is one worker's push.

    Each step applies its gradient at once, ``p -= lr * g``, and adds it to ``pending``.
    Every ``every``-th step the momentum takes the pending sum and is applied:
    ``m = momentum * m + pending``, ``p -= lr * momentum * m`` (Nesterov: the new buffer)
    or ``p -= lr * momentum * m_old`` (heavy ball: the buffer before), then pending = 0.
    Over ``every`` steps that is exactly one step of ``SGD(momentum, nesterov)`` on their
    sum: ``p -= lr * (sum + momentum * m)``. So when each of M workers' pushes carries 1/M
    of a round (``ps.core.shard``, ``pushes_per_round``) and ``every`` = M, M pushes in
    a row move the parameters as one synchronous round does; ``every`` = 1 is torch's
    SGD (to rounding: two roundings where torch has one). What changes is in between:
    the momentum, built from stale pseudo-gradients, is not re-applied on every one."""

    def __init__(self, size, lr, momentum=0.0, nesterov=False, every=1, chunk=CHUNK):
        super().__init__(size, chunk)
        self.lr, self.momentum, self.nesterov, self.every = lr, momentum, nesterov, every
        if momentum != 0:
            self._buffers["momentum_buffer"] = np.zeros(self.size, F32)
            self._buffers["pending"] = np.zeros(self.size, F32)

    def _update(self, p, g, lo, hi, step):
        tmp = self._tmp[:hi - lo]
        _add_scaled_(p, g, -self.lr, tmp)             # the gradient, applied at once
        if self.momentum == 0:
            return
        pending, buf = self._buffers["pending"][lo:hi], self._buffers["momentum_buffer"][lo:hi]
        np.add(pending, g, out=pending)
        if step % self.every:
            return
        if not self.nesterov:                         # heavy ball: the buffer before
            _add_scaled_(p, buf, -self.lr * self.momentum, tmp)
        np.multiply(buf, _f32(self.momentum), out=buf)
        np.add(buf, pending, out=buf)                 # m = momentum * m + pending
        if self.nesterov:
            _add_scaled_(p, buf, -self.lr * self.momentum, tmp)
        pending.fill(0)


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay folded into the gradient) and, with
    ``decoupled_weight_decay``, torch.optim.AdamW (parameters shrunk directly)."""

    def __init__(self, size, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, decoupled_weight_decay=False, chunk=CHUNK):
        super().__init__(size, chunk)
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.weight_decay, self.amsgrad, self.maximize = weight_decay, amsgrad, maximize
        self.decoupled = decoupled_weight_decay
        self._l2 = 0.0 if decoupled_weight_decay else weight_decay
        self._buffers["exp_avg"] = np.zeros(self.size, F32)
        self._buffers["exp_avg_sq"] = np.zeros(self.size, F32)
        if amsgrad:
            self._buffers["max_exp_avg_sq"] = np.zeros(self.size, F32)

    def _update(self, p, g, lo, hi, step):
        m, v = self._buffers["exp_avg"][lo:hi], self._buffers["exp_avg_sq"][lo:hi]
        tmp = self._tmp[:hi - lo]
        if self.decoupled and self.weight_decay != 0:
            np.multiply(p, _f32(1 - self.lr * self.weight_decay), out=p)

        _lerp_(m, g, 1 - self.beta1, tmp)             # m = b1*m + (1-b1)*g
        np.multiply(v, _f32(self.beta2), out=v)       # v = b2*v + (1-b2)*g*g
        np.multiply(g, _f32(1 - self.beta2), out=tmp)
        np.multiply(tmp, g, out=tmp)
        np.add(v, tmp, out=v)

        # Bias corrections in Python float64, as torch computes them from step.item().
        step_size = self.lr / (1 - self.beta1 ** step)
        bias_correction2_sqrt = (1 - self.beta2 ** step) ** 0.5
        if self.amsgrad:
            top = self._buffers["max_exp_avg_sq"][lo:hi]
            v = np.maximum(top, v, out=top)
        np.sqrt(v, out=tmp)                           # denom = sqrt(v)/bc2_sqrt + eps
        np.divide(tmp, _f32(bias_correction2_sqrt), out=tmp)
        np.add(tmp, _f32(self.eps), out=tmp)
        # The scratch chunk self._g is free now: it either held g, which is spent, or was
        # never used (g was the caller's grad). It takes the numerator, -step_size * m.
        num = np.multiply(m, _f32(-step_size), out=self._g[:hi - lo])
        np.divide(num, tmp, out=num)                  # torch's addcdiv: (s * m) / denom
        np.add(p, num, out=p)


def _check_number(name, value, low=0.0, below=None):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (value >= low and (below is None or value < below)):   # also rejects NaN
        raise ValueError(f"invalid {name}: {value!r}, must be in [{low}, {below or 'inf'})")
    return float(value)


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def _sgd(size, chunk, lr=None, momentum=0.0, dampening=0.0, weight_decay=0.0,
         nesterov=False, maximize=False):
    if lr is None:
        raise ValueError("sgd requires lr (no default: torch's 1e-3 is rarely right for SGD)")
    lr, momentum = _check_number("lr", lr), _check_number("momentum", momentum)
    dampening = _check_number("dampening", dampening, low=-np.inf)  # torch allows any
    weight_decay = _check_number("weight_decay", weight_decay)
    nesterov, maximize = _check_bool("nesterov", nesterov), _check_bool("maximize", maximize)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov requires momentum > 0 and dampening == 0")
    return SGD(size, lr, momentum, dampening, weight_decay, nesterov, maximize, chunk)


def _delayed_sgd(size, chunk, lr=None, momentum=0.0, nesterov=False, every=1):
    if lr is None:
        raise ValueError("delayed_sgd requires lr")
    lr, momentum = _check_number("lr", lr), _check_number("momentum", momentum)
    nesterov = _check_bool("nesterov", nesterov)
    if nesterov and momentum <= 0:
        raise ValueError("nesterov requires momentum > 0")
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    return DelayedSGD(size, lr, momentum, nesterov, int(every), chunk)


def _adam(size, chunk, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
          amsgrad=False, maximize=False, *, decoupled_weight_decay=False):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    betas = tuple(_check_number(f"betas[{i}]", b, below=1.0)
                  for i, b in enumerate(betas))
    return Adam(size, _check_number("lr", lr), betas, _check_number("eps", eps),
                _check_number("weight_decay", weight_decay),
                _check_bool("amsgrad", amsgrad), _check_bool("maximize", maximize),
                decoupled_weight_decay, chunk)


def _adamw(size, chunk, weight_decay=1e-2, **kwargs):   # torch's AdamW default decay: 0.01
    return _adam(size, chunk, weight_decay=weight_decay, decoupled_weight_decay=True, **kwargs)


# name -> (builder, the config keys it accepts); keys are torch's argument names.
_ADAM_KEYS = {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"}
_FACTORIES = {
    "sgd": (_sgd, {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"}),
    "delayed_sgd": (_delayed_sgd, {"lr", "momentum", "nesterov", "every"}),
    "adam": (_adam, _ADAM_KEYS),
    "adamw": (_adamw, _ADAM_KEYS),
}


def make_optimizer(config: dict, size: int, chunk: int = CHUNK,
                   segments: list | None = None) -> "Optimizer":   # or a Grouped, which steps alike
    """Build the optimizer named by ``config["name"]`` (any case) for a shard of ``size``.

    Other keys are torch's arguments, e.g. ``{"name": "sgd", "lr": 0.1, "momentum": 0.9}``;
    omitted ones take torch's defaults; ``chunk`` (elements per pass) changes speed and
    scratch size, never results. ``segments``: parameter groups, as ``[start, end,
    overrides]`` ranges of this shard covering ``[0, size)`` in order, each with its own
    hyperparameters (``ps.core.param_groups.Grouped``). Raises ValueError naming any bad argument.
    """
    if segments:                   # here, not at the top: param_groups builds with this
        from ps.core.param_groups import Grouped
        return Grouped(config, size, segments, chunk)
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise ValueError(f"optimizer config must be a dict with a string 'name', got {config!r}")
    name = config["name"].lower()
    if name not in _FACTORIES:
        raise ValueError(f"unknown optimizer name {config['name']!r}; "
                         f"known: {', '.join(sorted(_FACTORIES))}")
    build, known = _FACTORIES[name]
    args = {k: v for k, v in config.items() if k != "name"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for {name}; known: {sorted(known)}")
    return build(size, chunk, **args)
