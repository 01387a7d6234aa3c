"""One table's rows on one server: created on first touch, updated by steps, evicted,
snapshotted, and written out at the end (``ps.sparse``).

BSP keeps the previous version of the rows its last step changed, as the dense shard
keeps its previous version (``ps.core.shard``): a worker that dies after its sparse push
and before its dense one completes the table's step t while the dense shards still wait
for its tasks; those are computed again on version t, and their rows must be version t's,
not t + 1's. ``pull(ids, step)`` answers a pull for ``version - 1`` from ``before`` (the
changed rows as they were) and the current rows for the rest; an older one is ``Gone``.
The next step's update replaces it: by then every dense shard has completed step t (the
table's step t + 1 needed pushes made on version t + 1 of every shard), so no task of
step t is left to compute again."""
from __future__ import annotations

import numpy as np

from ps.sparse.index import RowIndex
from ps.sparse.optim import make_row_optimizer
from ps.sparse.rows import initial_rows, sum_by_id


class Gone(ValueError):
    """A pull for a BSP version this table no longer holds."""


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
        self.before: tuple | None = None
        # BSP: (version - 1, the sorted ids the last step changed, their rows then); None
        # where version - 1 is not held (no step applied since the start or a restore)
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

    def pull(self, ids: np.ndarray, step: int | None = None) -> np.ndarray:
        """The rows of ``ids`` (unique int64), created on first touch: (n, dim) float32;
        BSP, with ``step`` one behind the table: as they were at that version."""
        self.check_ids(ids)
        behind = step is not None and step < self.version
        if behind and (self.before is None or self.before[0] != step):
            raise Gone(f"table {self.name}: version {step} is gone; it holds version {self.version}")
        self.rows_pulled += ids.size
        at = self._rows_of(ids)               # first: it may grow (replace) self.rows
        rows = self.rows[at]
        if behind and self.before[1].size:
            _, changed, rows_then = self.before
            pos = np.minimum(np.searchsorted(changed, ids), changed.size - 1)
            hit = changed[pos] == ids
            rows[hit] = rows_then[pos[hit]]
        return rows

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
            uniq, total = sum_by_id(np.concatenate([p[0] for p in self.pending]),
                                    np.concatenate([p[1] for p in self.pending]))
            mean = total / np.float32(self.step_samples)
            at = self._rows_of(uniq)
            rows = self.rows[at]
            if self.mode == "bsp":                # version - 1's rows, for a redo (above)
                self.before = (self.version - 1, uniq, rows.copy())
            state = {k: v[at] for k, v in self.state.items()}
            self.optimizer.update(rows, state, mean.astype(np.float32), self.version)
            self.rows[at] = rows
            for k, v in state.items():
                self.state[k][at] = v
            self.rows_pushed += uniq.size
        elif self.mode == "bsp":                  # nothing changed: version - 1 is now
            self.before = (self.version - 1, np.empty(0, np.int64), np.empty((0, self.dim), np.float32))
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
            self.before = None                         # version - 1 is not in a checkpoint
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
