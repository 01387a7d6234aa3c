"""Sparse embedding tables on the servers: rows created on first touch, a per-row optimizer.

A table is a map from int64 ids to rows of ``dim`` float32s, too large for any worker:
each batch touches a sliver of it. A worker pulls the rows of its batch's unique ids and
pushes one gradient row per id; nothing else of the table moves (``worker.sparse``).

**Where a row lives.** ``vshard_of(ids)``: a hash of the id onto ``VSHARDS`` virtual
shards, many more than servers; server k of S holds the virtual shards
``[k V / S, (k + 1) V / S)`` (``server_of``). A reshard moves whole virtual shards.

**Its first value** is ``initial_rows(seed, name, ids, dim, init_std)``: N(0, init_std²)
from a counter-based generator keyed by (run seed, table name, id) alone, so it does not
depend on the server count or on the order rows are first touched, and a reference can
rebuild any row: ``k = mix(mix(seed) ^ name_hash(name) ^ id)``; column j's pair of
uniforms are ``mix(k + 2j)`` and ``mix(k + 2j + 1)``, top 53 bits over 2^53 (the first
moved into (0, 1]), and Box-Muller's cosine gives the normal. ``mix`` is SplitMix64's
finaliser. ``init_std`` 0 gives zeros.

**The index** (``RowIndex``) is numpy, not a dict (a dict costs ~100 bytes an entry):
a sorted array of ids with each one's row number (12 bytes a row), and a small sorted
buffer of ids added since the last merge, merged in once it holds more than an eighth of
the main array (an insert costs O(1) copies amortised). A lookup is two
``searchsorted``.

**A step (BSP)**: pushes of step t carry the step's task ids, the unique ids they touch
and the gradient rows of the loss *sum*; once every task of the step is in, the rows
are summed per id, divided by the step's samples (the mean over the global batch, as a
dense shard does) and the table's optimizer updates the rows present, with torch's
sparse semantics: ``sgd``; ``adagrad`` as ``torch.optim.Adagrad`` with a sparse gradient;
``adam`` as ``torch.optim.SparseAdam`` (lazy: only rows present move their moments).
The step count that Adagrad's lr decay and Adam's bias correction read is the table's
(as torch's is the embedding weight's): it advances every step, whether or not this
server's rows were touched.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

VSHARDS = 4096                    # virtual shards: many more than servers
SALT = np.uint64(0x9E3779B97F4A7C15)
MAX_DIM = 4096
OPTIMIZERS = {"sgd": {"lr"}, "adagrad": {"lr", "lr_decay", "eps", "initial_accumulator_value"},
              "adam": {"lr", "betas", "eps"}}


# -- hashing and first values -----------------------------------------------------------------

def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, on uint64 arrays (wrapping arithmetic)."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def name_hash(name: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))


def initial_rows(seed: int, name: str, ids, dim: int, init_std: float) -> np.ndarray:
    """The first value of rows ``ids`` of table ``name`` in a run of ``seed``: a
    (len(ids), dim) float32 array, N(0, init_std²), a function of (seed, name, id) only."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if init_std == 0 or ids.size == 0:
        return np.zeros((ids.size, dim), np.float32)
    with np.errstate(over="ignore"):
        base = _mix(np.array([seed], np.uint64))[0] ^ name_hash(name)
        keys = _mix(ids.view(np.uint64) ^ base)                            # (n,)
        j = np.arange(dim, dtype=np.uint64) * np.uint64(2)                  # (dim,)
        a = _mix(keys[:, None] + j[None, :]) >> np.uint64(11)               # (n, dim), 53 bits
        b = _mix(keys[:, None] + j[None, :] + np.uint64(1)) >> np.uint64(11)
    u1 = (a.astype(np.float64) + 1.0) / 2.0 ** 53                           # (0, 1]
    u2 = b.astype(np.float64) / 2.0 ** 53                                   # [0, 1)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
    return (z * init_std).astype(np.float32)


def vshard_of(ids: np.ndarray) -> np.ndarray:
    """The virtual shard of each id."""
    with np.errstate(over="ignore"):
        return (_mix(np.asarray(ids, np.int64).view(np.uint64) ^ SALT)
                % np.uint64(VSHARDS)).astype(np.int64)


def server_of(ids: np.ndarray, servers: int) -> np.ndarray:
    """The server holding each id: server k of S holds virtual shards [k V/S, (k+1) V/S)."""
    return vshard_of(ids) * servers // VSHARDS


# -- the table's spec -------------------------------------------------------------------------

def check_spec(spec) -> dict:
    """A table as a job declares it (``worker.sparse.SparseEmbedding.spec``); ValueError
    naming what is wrong. Returns it with defaults filled in."""
    if not isinstance(spec, dict):
        raise ValueError(f"a sparse table is a map, not {type(spec).__name__}")
    name, dim = spec.get("name"), spec.get("dim")
    if not (isinstance(name, str) and 0 < len(name) <= 64 and name.replace("_", "").isalnum()):
        raise ValueError(f"table name {name!r}: 1-64 letters, digits or _")
    if not (isinstance(dim, int) and not isinstance(dim, bool) and 0 < dim <= MAX_DIM):
        raise ValueError(f"table {name}: dim must be an int in [1, {MAX_DIM}], not {dim!r}")
    n = spec.get("num_embeddings")
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
        raise ValueError(f"table {name}: num_embeddings must be a positive int or None")
    std = spec.get("init_std", 0.01)
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 <= std < math.inf:
        raise ValueError(f"table {name}: init_std must be a number >= 0")
    opt = spec.get("optimizer")
    if not (isinstance(opt, dict) and opt.get("name") in OPTIMIZERS):
        raise ValueError(f"table {name}: optimizer must be a map named one of "
                         f"{sorted(OPTIMIZERS)}, not {opt!r}")
    unknown = set(opt) - {"name"} - OPTIMIZERS[opt["name"]]
    if unknown:
        raise ValueError(f"table {name}: unknown optimizer argument(s) {sorted(unknown)}")
    make_row_optimizer(opt, dim)              # its values
    evict = {}
    for key in ("max_rows", "evict_unseen_steps"):
        value = spec.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and value > 0):
            raise ValueError(f"table {name}: {key} must be a positive int or None")
        evict[key] = value
    return {"name": name, "dim": dim, "num_embeddings": n, "init_std": float(std),
            "optimizer": opt, **evict}


# -- the index ----------------------------------------------------------------------------------

class RowIndex:
    """ids -> row numbers: a sorted main array and a sorted buffer merged into it."""

    def __init__(self):
        self.keys = np.empty(0, np.int64)        # sorted
        self.pos = np.empty(0, np.int32)         # row number of each key
        self.new_keys = np.empty(0, np.int64)    # sorted, not in keys
        self.new_pos = np.empty(0, np.int32)

    def __len__(self) -> int:
        return self.keys.size + self.new_keys.size

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.pos, self.new_keys, self.new_pos))

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Row numbers of ``ids`` (int64, any order), -1 where absent."""
        out = np.full(ids.size, -1, np.int64)
        for keys, pos in ((self.keys, self.pos), (self.new_keys, self.new_pos)):
            if keys.size:
                at = np.searchsorted(keys, ids)
                hit = at < keys.size
                hit[hit] = keys[at[hit]] == ids[hit]
                out[hit] = pos[at[hit]]
        return out

    def add(self, ids: np.ndarray, first_row: int) -> None:
        """Index ``ids`` (unique, absent) as rows first_row, first_row + 1, ..."""
        order = np.argsort(ids, kind="stable")
        pos = (first_row + order).astype(np.int32)
        keys = ids[order]
        merged = np.concatenate([self.new_keys, keys])
        at = np.argsort(merged, kind="stable")
        self.new_keys, self.new_pos = merged[at], np.concatenate([self.new_pos, pos])[at]
        if self.new_keys.size > max(1024, self.keys.size // 8):
            merged = np.concatenate([self.keys, self.new_keys])
            at = np.argsort(merged, kind="stable")
            self.keys, self.pos = merged[at], np.concatenate([self.pos, self.new_pos])[at]
            self.new_keys, self.new_pos = np.empty(0, np.int64), np.empty(0, np.int32)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids sorted, their row numbers)."""
        keys = np.concatenate([self.keys, self.new_keys])
        at = np.argsort(keys, kind="stable")
        return keys[at], np.concatenate([self.pos, self.new_pos])[at]


# -- per-row optimizers -------------------------------------------------------------------------

class RowOptimizer:
    """Updates rows present in a step, in place; state arrays grow with the table."""
    state_names: tuple[str, ...] = ()

    def update(self, rows: np.ndarray, state: dict, grad: np.ndarray, step: int) -> None:
        raise NotImplementedError


class RowSGD(RowOptimizer):
    def __init__(self, lr):
        self.lr = np.float32(lr)

    def update(self, rows, state, grad, step):
        rows -= self.lr * grad


class RowAdagrad(RowOptimizer):
    """torch.optim.Adagrad's sparse path: sum += g², p -= clr g / (sqrt(sum) + eps)."""
    state_names = ("sum",)

    def __init__(self, lr=0.01, lr_decay=0.0, eps=1e-10, initial_accumulator_value=0.0):
        self.lr, self.lr_decay, self.eps = lr, lr_decay, np.float32(eps)
        self.initial = np.float32(initial_accumulator_value)

    def update(self, rows, state, grad, step):
        clr = self.lr / (1 + (step - 1) * self.lr_decay)
        total = state["sum"]
        total += grad * grad
        std = np.sqrt(total) + self.eps
        rows += np.float32(-clr) * (grad / std)


class RowAdam(RowOptimizer):
    """torch.optim.SparseAdam: lazy moments, bias correction by the table's step count."""
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, np.float32(eps)

    def update(self, rows, state, grad, step):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m_update = (grad - m) * np.float32(1 - self.beta1)
        v_update = (grad * grad - v) * np.float32(1 - self.beta2)
        numer = m_update + m
        denom_sq = v_update + v
        m += m_update
        v += v_update
        denom = np.sqrt(denom_sq) + self.eps
        step_size = self.lr * math.sqrt(1 - self.beta2 ** step) / (1 - self.beta1 ** step)
        rows += np.float32(-step_size) * (numer / denom)


def make_row_optimizer(config: dict, dim: int) -> RowOptimizer:
    args = {k: v for k, v in config.items() if k != "name"}
    for key, value in args.items():
        ok = (isinstance(value, (list, tuple)) and len(value) == 2 and key == "betas"
              and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in value)) or (
            key != "betas" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0 <= value < math.inf)
        if not ok:
            raise ValueError(f"bad {config['name']} argument {key}={value!r}")
    return {"sgd": RowSGD, "adagrad": RowAdagrad, "adam": RowAdam}[config["name"]](**args)


# -- the table on one server --------------------------------------------------------------------

class SparseTable:
    """One table's rows on one server, its optimizer state and its BSP step in progress."""

    def __init__(self, spec: dict, seed: int, mode: str = "bsp", servers: int = 1):
        self.spec, self.mode = spec, mode              # bsp; ssp or asp: pushes on arrival
        # eviction: this server's share of max_rows, and rows unseen for this many steps
        self.max_rows = -(-spec["max_rows"] // servers) if spec.get("max_rows") else None
        self.unseen_steps = spec.get("evict_unseen_steps")
        self.seen = np.empty(0, np.int64)              # per row: the last step it was read
        self.evicted = 0
        self.name, self.dim = spec["name"], spec["dim"]
        self.seed, self.init_std = seed, spec["init_std"]
        self.num_embeddings = spec["num_embeddings"]
        self.optimizer = make_row_optimizer(spec["optimizer"], self.dim)
        self.index = RowIndex()
        self.rows = np.empty((0, self.dim), np.float32)       # capacity >= len(index)
        self.state = {k: np.empty((0, self.dim), np.float32) for k in self.optimizer.state_names}
        self.version = 0                                      # steps applied
        self.step_tasks_seen: set[int] = set()
        self.step_total = 0
        self.step_samples = 0
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []   # this step's (ids, grads)
        self.applied: set[int] = set()                # SSP/ASP: every task id applied
        self.duplicates_rejected = 0
        self.rows_pulled = self.rows_pushed = 0

    def __len__(self) -> int:
        return len(self.index)

    def nbytes(self) -> dict:
        n = len(self.index)
        return {"row_bytes": n * self.dim * 4, "state_bytes": n * self.dim * 4 * len(self.state),
                "index_bytes": self.index.nbytes(), "allocated_bytes": self.rows.nbytes
                + sum(s.nbytes for s in self.state.values())}

    def check_ids(self, ids: np.ndarray) -> None:
        if self.num_embeddings is not None and ids.size and (
                ids.min() < 0 or ids.max() >= self.num_embeddings):
            bad = ids[(ids < 0) | (ids >= self.num_embeddings)][0]
            raise ValueError(f"id {int(bad)} is outside [0, {self.num_embeddings}) of "
                             f"table {self.name}")

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row numbers of ``ids`` (unique), creating the absent ones from initial_rows."""
        at = self._lookup_or_create(ids)
        if self.seen.size:
            self.seen[at] = self.version
        return at

    def _lookup_or_create(self, ids: np.ndarray) -> np.ndarray:
        at = self.index.lookup(ids)
        absent = at < 0
        if absent.any():
            new = ids[absent]
            first = len(self.index)
            self._grow(first + new.size)
            self.rows[first:first + new.size] = initial_rows(self.seed, self.name, new,
                                                             self.dim, self.init_std)
            for name, arr in self.state.items():
                arr[first:first + new.size] = (self.optimizer.initial if name == "sum" else 0)
            self.index.add(new, first)
            at[absent] = np.arange(first, first + new.size)
        return at

    def _grow(self, need: int) -> None:
        if need <= self.rows.shape[0]:
            return
        cap = max(need, int(self.rows.shape[0] * 1.5), 1024)
        if self.max_rows or self.unseen_steps:
            seen = np.zeros(cap, np.int64)
            seen[:self.seen.size] = self.seen
            self.seen = seen
        for holder, key in [(self, "rows")] + [(self.state, k) for k in self.state]:
            old = holder[key] if holder is self.state else self.rows
            new = np.empty((cap, self.dim), np.float32)
            new[:old.shape[0]] = old
            if holder is self.state:
                self.state[key] = new
            else:
                self.rows = new

    def pull(self, ids: np.ndarray) -> np.ndarray:
        """The rows of ``ids`` (unique int64), created on first touch: (n, dim) float32."""
        self.check_ids(ids)
        self.rows_pulled += ids.size
        at = self._rows_of(ids)               # first: it may grow (replace) self.rows
        return self.rows[at]

    def push(self, step: int, tasks: list[int], samples: int, step_tasks: int,
             ids: np.ndarray, grads: np.ndarray) -> bool:
        """A BSP push of step ``step``: add it to the step; apply the step once complete.
        False: a duplicate (an older step, or tasks already in). SSP and ASP: applied on
        arrival, as the mean over its own samples; the step count is the table's updates."""
        if self.mode != "bsp":
            return self._push_now(tasks, samples, ids, grads)
        if step < self.version or any(t in self.step_tasks_seen for t in tasks):
            self.duplicates_rejected += 1
            return False
        if step > self.version:
            raise ValueError(f"push for step {step}, table {self.name} is at {self.version}")
        if self.step_tasks_seen and step_tasks != self.step_total:
            raise ValueError(f"step {step} has {self.step_total} tasks, not {step_tasks}")
        if len(self.step_tasks_seen) + len(tasks) > step_tasks:
            raise ValueError(f"more than {step_tasks} tasks in step {step}")
        self.check_ids(ids)
        self.step_total = step_tasks
        self.step_tasks_seen.update(tasks)
        self.step_samples += samples
        if ids.size:
            self.pending.append((ids, grads))
        if len(self.step_tasks_seen) == step_tasks:
            self._apply()
        return True

    def _push_now(self, tasks, samples, ids, grads) -> bool:
        if any(t in self.applied for t in tasks):
            self.duplicates_rejected += 1
            return False
        self.check_ids(ids)
        if samples and tasks:                          # a clock tick carries nothing
            self.step_samples, self.pending = samples, [(ids, grads)] if ids.size else []
            self._apply()
            self.applied.update(tasks)
        return True

    def _apply(self) -> None:
        """The step's rows summed per id, over the step's samples, through the optimizer."""
        self.version += 1
        if self.pending:
            ids = np.concatenate([p[0] for p in self.pending])
            grads = np.concatenate([p[1] for p in self.pending])
            order = np.argsort(ids, kind="stable")
            ids, grads = ids[order], grads[order]
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            uniq = ids[starts]
            mean = np.add.reduceat(grads, starts, axis=0) / np.float32(self.step_samples)
            at = self._rows_of(uniq)
            rows = self.rows[at]
            state = {k: v[at] for k, v in self.state.items()}
            self.optimizer.update(rows, state, mean.astype(np.float32), self.version)
            self.rows[at] = rows
            for k, v in state.items():
                self.state[k][at] = v
            self.rows_pushed += uniq.size
        self.pending.clear()
        self.step_tasks_seen.clear()
        self.step_total = self.step_samples = 0
        if self.max_rows or self.unseen_steps:
            self._evict()

    def _evict(self) -> None:
        """Drop rows unseen for ``evict_unseen_steps`` steps, and the least recently seen
        beyond this server's share of ``max_rows`` (only once it is exceeded by an
        eighth, so that the compaction, a pass over the table, is paid rarely). An evicted
        row touched again starts over from its first value, with fresh optimizer state."""
        n = len(self.index)
        ids, pos = self.index.items()
        last = self.seen[pos]
        drop = np.zeros(n, bool)
        if self.unseen_steps and (self.version % max(1, self.unseen_steps // 8 or 1) == 0):
            drop |= last < self.version - self.unseen_steps
        if self.max_rows and n - drop.sum() > self.max_rows + self.max_rows // 8:
            alive = np.flatnonzero(~drop)
            oldest = alive[np.argsort(last[alive], kind="stable")]
            drop[oldest[:alive.size - self.max_rows]] = True
        if not drop.any():
            return
        keep = np.flatnonzero(~drop)
        kept_pos = pos[keep]
        self.rows[:keep.size] = self.rows[kept_pos]
        for k in self.state:
            self.state[k][:keep.size] = self.state[k][kept_pos]
        self.seen[:keep.size] = self.seen[kept_pos]
        self.index = RowIndex()
        self.index.add(ids[keep], 0)
        self.evicted += int(drop.sum())

    def dump(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids sorted, their rows): every row materialised here."""
        ids, pos = self.index.items()
        return ids, self.rows[pos]

    def snapshot(self) -> dict[str, np.ndarray]:
        """Copies of every row, its optimizer state and the step count, for a checkpoint
        (``restore`` takes them back, on any server count)."""
        ids, pos = self.index.items()
        return {"ids": ids, "rows": self.rows[pos], "version": np.int64(self.version),
                **{f"state_{k}": v[pos] for k, v in self.state.items()}}

    def restore(self, parts: list[dict], mine) -> None:
        """Rows of ``parts`` (snapshots of the same version, from the old servers) whose ids
        ``mine(ids)`` says this server holds now: a reshard moves whole virtual shards."""
        for part in parts:
            keep = mine(part["ids"])
            ids = part["ids"][keep]
            first = len(self.index)
            self._grow(first + ids.size)
            self.rows[first:first + ids.size] = part["rows"][keep]
            for k in self.state:
                self.state[k][first:first + ids.size] = part[f"state_{k}"][keep]
            self.index.add(ids, first)
            self.version = int(part["version"])
            if self.seen.size:                         # restored rows count as just seen
                self.seen[first:first + ids.size] = self.version


def merge_parts(out: str) -> list[str]:
    """The servers' parts of each table (``OUT/sparse/<name>.part<k>.npz``, written as they
    stop) merged into ``OUT/sparse/<name>.npz``: ``ids`` (int64, sorted) and ``rows``
    (float32), every row materialised. Returns the tables written."""
    import glob
    import os
    import re
    folder = os.path.join(out, "sparse")
    parts: dict[str, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.part*.npz"))):
        match = re.fullmatch(r"(\w+)\.part\d+\.npz", os.path.basename(path))
        if match:
            parts.setdefault(match.group(1), []).append(path)
    for name, paths in parts.items():
        loaded = [np.load(p) for p in paths]
        ids = np.concatenate([d["ids"] for d in loaded])
        rows = np.concatenate([d["rows"] for d in loaded])
        order = np.argsort(ids, kind="stable")
        tmp = os.path.join(folder, f".{name}.npz")
        np.savez(tmp, ids=ids[order], rows=rows[order])
        os.replace(tmp, os.path.join(folder, f"{name}.npz"))
        for p in paths:
            os.remove(p)
    return sorted(parts)
