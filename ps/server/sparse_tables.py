"""A server's sparse tables (``ps.sparse``): SPARSE_PULL and SPARSE_PUSH, and the rows it
writes at the end.

Every server holds, for every table of the job, the rows of its virtual shards
(``ps.sparse.server_of``). A message naming an id of another server is refused
(``wrong_shard``), as is an id outside ``[0, num_embeddings)`` (``bad_field``). Tables are
BSP like the dense shard: a pull for step t is answered once the table has applied step
t - 1 (until then ``not_ready``: the worker asks again; in practice the step is complete
before anyone pulls, since a worker's sparse pushes are acknowledged before its dense
push, and the dense step completes only with every worker's); a push adds to step t and
the step is applied once all of its tasks are in; a push whose tasks are in already is
answered ``applied`` false (exactly once, by task id, as for dense pushes).
"""
from __future__ import annotations

import os

import numpy as np

from ps.reliability import checkpoint
from ps.sparse import Gone, SparseTable, check_spec, server_of
from ps.wire import transport, validation
from ps.wire.protocol import Error, ProtocolError, check_int_list


class Tables:
    def __init__(self, specs: list[dict], seed: int, index: int, servers: int, mode: str = "bsp"):
        self.tables = {spec["name"]: SparseTable(check_spec(spec), seed, mode, servers)
                       for spec in specs}
        self.mode = mode
        self.index, self.servers = index, servers

    def __bool__(self) -> bool:
        return bool(self.tables)

    def _table(self, header) -> SparseTable:
        table = self.tables.get(header["table"])
        if table is None:
            raise ProtocolError(Error.BAD_FIELD, f"no sparse table {header['table']!r}")
        return table

    def _ids_here(self, table: SparseTable, ids: np.ndarray) -> None:
        if ids.size and (server_of(ids, self.servers) != self.index).any():
            raise ProtocolError(Error.WRONG_SHARD, f"ids of table {table.name} held by another server")
        try:
            table.check_ids(ids)
        except ValueError as exc:
            raise ProtocolError(Error.BAD_FIELD, str(exc)) from None

    def pull(self, header, payload) -> tuple[dict, list]:
        """A SPARSE_PULL: (reply fields, payload frames: the rows, float32)."""
        table = self._table(header)
        ids, _ = validation.sparse_payload(payload, header["n"], None)
        self._ids_here(table, ids)
        if self.mode == "bsp" and header["step"] > table.version:
            raise ProtocolError(Error.NOT_READY, f"table {table.name} is at step {table.version}")
        try:                      # BSP: a redo of the step just applied reads its old rows
            rows = table.pull(ids, header["step"] if self.mode == "bsp" else None)
        except Gone as exc:
            raise ProtocolError(Error.GONE, str(exc)) from None
        return {"n": ids.size, "dim": table.dim, "version": table.version}, transport.split(rows.reshape(-1))

    def push(self, header, payload) -> bool:
        """A SPARSE_PUSH: whether it was applied (False: its tasks are in already)."""
        table = self._table(header)
        tasks = check_int_list(header, "tasks", 1 << 16)
        if header["step"] < 0 or header["step_tasks"] < 1 or header["samples"] < 0:
            raise ProtocolError(Error.BAD_FIELD, "step and samples must be >= 0, step_tasks >= 1")
        ids, rows = validation.sparse_payload(payload, header["n"], table.dim)
        self._ids_here(table, ids)
        try:
            return table.push(header["step"], tasks, header["samples"], header["step_tasks"],
                              ids, rows)
        except ValueError as exc:
            raise ProtocolError(Error.BAD_FIELD, str(exc)) from None

    def stats(self) -> dict:
        return {name: {"rows": len(t), "version": t.version, **t.nbytes(),
                       "rows_pulled": t.rows_pulled, "rows_pushed": t.rows_pushed,
                       "duplicates_rejected": t.duplicates_rejected, "evicted": t.evicted}
                for name, t in self.tables.items()}

    def snapshot(self) -> dict[str, np.ndarray]:
        """Every table's state, as arrays named ``sparse.<table>.<array>``, for a
        checkpoint's shard file."""
        return {f"sparse.{name}.{k}": v for name, t in self.tables.items()
                for k, v in t.snapshot().items()}

    def restore(self, manifest: dict) -> None:
        """Every table's rows that this server holds now, from all of a checkpoint's
        shard files (the old server count may differ)."""
        for name, table in self.tables.items():
            parts = checkpoint.load_sparse(manifest, name)
            table.restore(parts, lambda ids: server_of(ids, self.servers) == self.index)

    def write(self, out: str) -> None:
        """Every table's rows held here, as OUT/sparse/<name>.part<k>.npz (ids sorted);
        the launcher merges the parts into OUT/sparse/<name>.npz."""
        folder = os.path.join(out, "sparse")
        os.makedirs(folder, exist_ok=True)
        for name, table in self.tables.items():
            ids, rows = table.dump()
            tmp = os.path.join(folder, f".{name}.part{self.index}.npz")
            np.savez(tmp, ids=ids, rows=rows)
            os.replace(tmp, os.path.join(folder, f"{name}.part{self.index}.npz"))
