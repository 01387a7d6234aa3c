"""A tiny model with a sparse table, for the sparse oracle tests: fixed data, no shuffling.

Each sample is a bag of 3 item ids out of ``SPARSE_BAG_N`` (default 60) and a target;
``SparseEmbedding("items", 4, mode="sum")`` pools the bag, a dense ``Linear(4, 1)`` reads
it. The table's optimizer comes from ``SPARSE_BAG_OPTIMIZER`` (JSON), the dense one is
SGD. ``reference_model(seed)`` is the single-process equivalent: the same dense layer,
and ``nn.EmbeddingBag(N, 4, sparse=True)`` from ``ps.sparse.initial_rows``.
"""
import json
import os
import time

import torch
from torch import nn

from worker.sparse import SparseEmbedding

N = int(os.environ.get("SPARSE_BAG_N", "60"))
TABLE_OPTIMIZER = json.loads(os.environ.get("SPARSE_BAG_OPTIMIZER", '{"name": "adagrad", "lr": 0.1}'))
OPTIMIZER = {"name": "sgd", "lr": 0.1}
BATCH_SIZE = 24
SHUFFLE = False
DELAY_S = float(os.environ.get("SPARSE_BAG_DELAY_S", "0"))
MAX_ROWS = int(os.environ.get("SPARSE_BAG_MAX_ROWS", "0")) or None    # eviction tests


class Model(nn.Module):
    def __init__(self, items: nn.Module):
        super().__init__()
        self.items = items
        self.head = nn.Linear(4, 1)

    def forward(self, ids):
        return self.head(self.items(ids)).squeeze(-1)


def build_model():
    return Model(SparseEmbedding("items", 4, num_embeddings=N, init_std=0.1,
                                 optimizer=TABLE_OPTIMIZER, mode="sum", max_rows=MAX_ROWS))


def reference_model(seed):
    model = build_model()
    model.items = model.items.reference(seed)
    return model


def build_dataset():
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(0, N, (200, 3), generator=g)              # (200, 3)
    y = (ids.float().mean(1) / N - 0.5) * 4                         # (200,)
    return torch.utils.data.TensorDataset(ids, y)


def loss_fn(model, batch):
    ids, y = batch
    if DELAY_S:
        time.sleep(DELAY_S * len(ids) / 8)
    return nn.functional.mse_loss(model(ids), y)
