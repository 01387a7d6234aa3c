"""A table's rows before any training: where each id lives and what it starts as, and a
table's spec as a job declares it (``ps.sparse``)."""
from __future__ import annotations

import hashlib
import math

import numpy as np

from ps.sparse.optim import OPTIMIZERS, make_row_optimizer

VSHARDS = 4096                    # virtual shards: many more than servers
SALT = np.uint64(0x9E3779B97F4A7C15)
MAX_DIM = 4096

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


def sum_by_id(ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct ids sorted, the rows of each id summed): what a step's pushes, or a
    worker's forward passes, add up to per id."""
    order = np.argsort(ids, kind="stable")
    ids, rows = ids[order], rows[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return ids[starts], np.add.reduceat(rows, starts, axis=0)


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
