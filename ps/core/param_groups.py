"""Parameter groups on one shard: one optimizer per consecutive range of the shard, each
with the hyperparameters of the job's group it belongs to (``make_optimizer(...,
segments=...)`` builds a ``Grouped``; ``ps.core.optim`` holds the optimizers themselves).
"""
import numpy as np

from ps.core.optim import CHUNK, Optimizer, make_optimizer


class Grouped:
    """Parameter groups on one shard: consecutive ranges with their own hyperparameters.

    A job's groups (``weight_decay`` on the 2-D weights only, say) are ranges of the flat
    vector; a shard cuts them at its own bounds into *segments*, ``[start, end, overrides]``
    covering ``[0, size)``, and steps one optimizer per segment, each on its slice (views:
    nothing is copied). To the shard it is one optimizer: ``step``, ``state`` (each state
    array the segments' arrays end to end, the layout of an ungrouped shard, so checkpoints
    and a resume into another server count read it alike) and ``load_state``.

        opt = make_optimizer({"name": "adamw", "lr": 1e-3}, 10,
                             segments=[[0, 6, {"weight_decay": 0.1}], [6, 10, {"weight_decay": 0.0}]])
    """

    def __init__(self, config: dict, size: int, segments: list, chunk: int = CHUNK):
        self.size = int(size)
        self.bounds: list[tuple[int, int]] = []
        self.parts: list[Optimizer] = []
        self.own_lr: list[float | None] = []          # a group's own lr, scaled by a schedule
        self.base_lr = make_optimizer(config, 1).lr   # OPTIMIZER's (or torch's default) lr
        at = 0
        for start, end, overrides in segments:
            if start != at or not start < end <= self.size or not isinstance(overrides, dict):
                raise ValueError(f"segments must cover [0, {self.size}) in order with a dict "
                                 f"of overrides each; got {start}, {end} after {at}")
            if "name" in overrides:
                raise ValueError("a parameter group cannot change the optimizer's name")
            self.parts.append(make_optimizer({**config, **overrides}, end - start, chunk))
            self.bounds.append((start, end))
            self.own_lr.append(overrides.get("lr"))
            at = end
        if at != self.size:
            raise ValueError(f"segments cover [0, {at}), not [0, {self.size})")
        # One pair of scratch chunks for every segment: they step one after the other.
        widest = max(self.parts, key=lambda o: o._g.size)
        for opt in self.parts:
            opt._g, opt._tmp = widest._g, widest._tmp

    def set_lr(self, lr: float) -> None:
        """A schedule's rate: a group that sets its own lr is scaled by ``lr /
        OPTIMIZER["lr"]`` (as torch's LambdaLR scales every group); the others take ``lr``."""
        for opt, own in zip(self.parts, self.own_lr):
            opt.set_lr(lr if own is None else own * (lr / self.base_lr))

    def step(self, params: np.ndarray, grad, divide_by: int = 1,
             keep: np.ndarray | None = None, scale: float = 1.0) -> None:
        """As ``Optimizer.step``, each segment with its own hyperparameters."""
        pieces = [grad] if isinstance(grad, np.ndarray) else grad
        if sum(g.size for g in pieces) != self.size or params.shape != (self.size,):
            raise ValueError(f"params and grad must hold {self.size} floats")
        cut = _cut_pieces(pieces, self.bounds)
        for (lo, hi), opt, part in zip(self.bounds, self.parts, cut):
            opt.step(params[lo:hi], part[0] if len(part) == 1 else part, divide_by,
                     None if keep is None else keep[lo:hi], scale)

    def state(self) -> dict:
        parts = [opt.state() for opt in self.parts]
        return {"step": parts[0]["step"],
                **{k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "step"}}

    def state_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for opt in self.parts:
            for k, v in opt.state_bytes().items():
                out[k] = out.get(k, 0) + (v if k != "scratch" else 0)
        out["scratch"] = self.parts[0].state_bytes()["scratch"]
        return out

    def load_state(self, state: dict) -> None:
        for (lo, hi), opt in zip(self.bounds, self.parts):
            opt.load_state({k: (v if k == "step" else np.asarray(v)[lo:hi])
                            for k, v in state.items()})


def _cut_pieces(pieces: list[np.ndarray], bounds: list[tuple[int, int]]) -> list[list]:
    """Cut a gradient given as consecutive 1-D pieces at ``bounds``: per range, the views
    of the pieces that fall in it (no copy)."""
    out, starts, at = [], [], 0
    for g in pieces:
        starts.append(at)
        at += g.size
    for lo, hi in bounds:
        part = []
        for g, s in zip(pieces, starts):
            a, b = max(lo, s), min(hi, s + g.size)
            if a < b:
                part.append(g[a - s:b - s])
        out.append(part)
    return out
