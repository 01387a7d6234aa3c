"""The id index of a table on one server: numpy arrays, not a dict (``ps.sparse``)."""
from __future__ import annotations

import numpy as np


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
