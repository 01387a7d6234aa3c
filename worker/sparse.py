"""Sparse embedding tables on the worker side: ``SparseEmbedding``, and how its rows move.

In a job's ``build_model()``::

    from worker.sparse import SparseEmbedding
    emb = SparseEmbedding(name="items", embedding_dim=32, num_embeddings=None,  # None: any int64 id
                          init_std=0.01, optimizer={"name": "adagrad", "lr": 0.05},
                          mode="sum")                                         # or "mean", or None

The table lives on the servers (``ps.sparse``), never whole on a worker. ``forward(ids)``
takes an int64 tensor of any shape: it pulls the rows of the batch's unique ids from the
servers holding them (``SparseClient.pull``, BSP: the rows of the step being computed),
makes them a leaf tensor that autograd fills with gradients, and returns
``rows[inverse]`` of shape ``(*ids.shape, dim)``, or with ``mode`` the bags pooled over the
last dimension. After backward the worker pushes one gradient row per unique id (the
loss *sum*'s, as for dense parameters; the servers divide by the step's samples), before
its dense push (``SparseClient.push``), with the same task ids: exactly once by task id.
The module holds no parameters, so the dense flat model does not see it.

Outside a cluster (no client bound) the module refuses to run: a single-process
reference builds ``torch.nn.Embedding(N, dim, sparse=True)`` from
``ps.sparse.initial_rows`` instead (``SparseEmbedding.reference``).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ps.sparse import check_spec, initial_rows, server_of, sum_by_id
from ps.wire import transport
from ps.wire.client import RemoteError
from ps.wire.protocol import Error, Kind

NOT_READY_WAIT_S = 0.005     # a table one step behind: ask again this soon


class SparseEmbedding(nn.Module):
    def __init__(self, name: str, embedding_dim: int, num_embeddings: int | None = None,
                 init_std: float = 0.01, optimizer: dict | None = None, mode: str | None = None,
                 max_rows: int | None = None, evict_unseen_steps: int | None = None):
        super().__init__()
        if mode not in (None, "sum", "mean"):
            raise ValueError(f"mode must be None, 'sum' or 'mean', not {mode!r}")
        self._spec = check_spec({"name": name, "dim": embedding_dim,
                                 "num_embeddings": num_embeddings, "init_std": init_std,
                                 "optimizer": optimizer or {"name": "sgd", "lr": 0.01},
                                 "max_rows": max_rows, "evict_unseen_steps": evict_unseen_steps})
        self.name, self.embedding_dim, self.mode = name, embedding_dim, mode
        self.num_embeddings = num_embeddings
        self.client: SparseClient | None = None
        self.touched: list[tuple[np.ndarray, torch.Tensor]] = []   # this step's (ids, rows)

    def spec(self) -> dict:
        return dict(self._spec)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.client is None:
            raise RuntimeError(f"SparseEmbedding {self.name!r} runs on a cluster only (its rows "
                               "are on the servers); a reference uses .reference(seed)")
        if ids.dtype != torch.int64:
            raise TypeError(f"SparseEmbedding {self.name!r} takes int64 ids, not {ids.dtype}")
        uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        uniq_np = uniq.cpu().numpy()
        rows = torch.from_numpy(self.client.pull(self.name, uniq_np)).to(ids.device)
        if torch.is_grad_enabled() and self.training:
            rows.requires_grad_(True)
            self.touched.append((uniq_np, rows))
        out = rows[inverse].reshape(*ids.shape, self.embedding_dim)
        if self.mode == "sum":
            return out.sum(-2)
        if self.mode == "mean":
            return out.mean(-2)
        return out

    def take_grads(self) -> tuple[np.ndarray, np.ndarray]:
        """This step's gradient rows, one per unique id touched (summed over the forward
        passes since the last call), and forget them."""
        touched, self.touched = self.touched, []
        if not touched:
            return np.empty(0, np.int64), np.empty((0, self.embedding_dim), np.float32)
        ids = np.concatenate([i for i, _ in touched])
        grads = np.concatenate([(r.grad if r.grad is not None else torch.zeros_like(r))
                                .detach().cpu().numpy() for _, r in touched])
        ids, grads = sum_by_id(ids, grads)
        return ids, grads.astype(np.float32, copy=False)

    def reference(self, seed: int) -> nn.Module:
        """The single-process equivalent: ``nn.Embedding(N, dim, sparse=True)`` (or an
        ``EmbeddingBag`` with ``mode``), its weight ``initial_rows(seed, name, 0..N-1)``."""
        if self.num_embeddings is None:
            raise ValueError(f"table {self.name!r} has no num_embeddings: no dense reference")
        weight = torch.from_numpy(initial_rows(seed, self.name, np.arange(self.num_embeddings),
                                               self.embedding_dim, self._spec["init_std"]))
        if self.mode is None:
            return nn.Embedding.from_pretrained(weight, freeze=False, sparse=True)
        return nn.EmbeddingBag.from_pretrained(weight, freeze=False, sparse=True, mode=self.mode)


def tables_of(model: nn.Module) -> list[SparseEmbedding]:
    return [m for m in model.modules() if isinstance(m, SparseEmbedding)]


class SparseClient:
    """Pull and push rows of the job's tables, each id to the server holding it."""

    def __init__(self, shards, tables: list[SparseEmbedding], timeout_s: float):
        self.shards = shards                 # a ShardClient: its peers are the servers, in order
        self.tables = tables
        self.timeout_s = timeout_s
        self.step = 0                        # the step being computed (BSP: rows of version step)
        for t in tables:
            t.client = self

    def _by_server(self, ids: np.ndarray) -> list[np.ndarray]:
        """For each server, the positions in ``ids`` of the ids it holds."""
        where = server_of(ids, len(self.shards.peers))
        return [np.flatnonzero(where == k) for k in range(len(self.shards.peers))]

    def pull(self, table: str, ids: np.ndarray) -> np.ndarray:
        """The rows of ``ids`` (distinct) at the current step: (n, dim) float32."""
        dim = next(t.embedding_dim for t in self.tables if t.name == table)
        out = np.empty((ids.size, dim), np.float32)
        deadline = time.monotonic() + self.timeout_s
        todo = [(k, at) for k, at in enumerate(self._by_server(ids)) if at.size]
        while todo:
            sent = [(k, at, self.shards.peers[k].send(
                Kind.SPARSE_PULL, transport.split(np.ascontiguousarray(ids[at])),
                worker=self.shards.worker, inc=self.shards.inc, step=self.step, table=table,
                n=int(at.size))) for k, at in todo]
            todo = []
            for k, at, rid in sent:
                try:
                    _, frames = self.shards.peers[k].recv(rid, self.timeout_s, f"rows of {table}")
                except RemoteError as exc:
                    if exc.code != Error.NOT_READY or time.monotonic() > deadline:
                        raise
                    todo.append((k, at))         # the table is a step behind: ask again
                    continue
                out[at] = np.frombuffer(b"".join(bytes(memoryview(f)) for f in frames),
                                        "<f4").reshape(at.size, dim)
                self.shards.wire_pulled += 4 * at.size * dim     # the run's byte counts
                self.shards.wire_pushed += 8 * at.size           # (ids asked for)
            if todo:
                time.sleep(NOT_READY_WAIT_S)
        return out

    def push(self, step: int, tasks: list[int], samples: int, step_tasks: int) -> list[bool]:
        """Every table's gradient rows of this step's passes, to every server (those with
        no id of it too: a BSP step completes when every task is in everywhere). Returns,
        per message, whether it was applied."""
        sent = []
        for t in self.tables:
            ids, grads = t.take_grads()
            for k, at in enumerate(self._by_server(ids)):
                part_ids, part = np.ascontiguousarray(ids[at]), np.ascontiguousarray(grads[at])
                frames = transport.split(part_ids) + transport.split(part.reshape(-1))
                self.shards.wire_pushed += part_ids.nbytes + part.nbytes
                sent.append((k, self.shards.peers[k].send(
                    Kind.SPARSE_PUSH, frames, worker=self.shards.worker, inc=self.shards.inc,
                    step=step, table=t.name, n=int(at.size), tasks=tasks, samples=samples,
                    step_tasks=step_tasks)))
        return [self.shards.peers[k].recv(rid, self.timeout_s, "sparse push")[0].get("applied", True)
                for k, rid in sent]

    def forget(self) -> None:
        """Drop the rows touched (a pass whose push will not happen)."""
        for t in self.tables:
            t.touched = []
