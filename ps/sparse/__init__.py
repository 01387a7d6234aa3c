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
server's rows were touched. The rows a step changed are kept as they were, for a task of
that step computed again (``table``).

The package, in the order to read it: ``rows`` (first values, virtual shards, a table's
spec), ``index`` (ids to row numbers), ``optim`` (per-row optimizers), ``table`` (a table
on one server).
"""
from ps.sparse.index import RowIndex
from ps.sparse.optim import OPTIMIZERS, make_row_optimizer
from ps.sparse.rows import (MAX_DIM, VSHARDS, check_spec, initial_rows, name_hash, server_of,
                            sum_by_id, vshard_of)
from ps.sparse.table import Gone, SparseTable, merge_parts

__all__ = ["Gone", "MAX_DIM", "OPTIMIZERS", "RowIndex", "SparseTable", "VSHARDS", "check_spec",
           "initial_rows", "make_row_optimizer", "merge_parts", "name_hash", "server_of",
           "sum_by_id", "vshard_of"]
