"""A click-through model for the ``sparse`` benchmark: bags of ids into one big table.

Each sample is a bag of ``SPARSE_CTR_BAG`` ids drawn uniformly from ``[0,
SPARSE_CTR_IDS)``, a function of the sample's index alone (a 64-bit mix, computed when
the sample is read, so the data set costs no memory whatever its size), and a target.
The model pools the bag's rows (``SparseEmbedding``, dim ``SPARSE_CTR_DIM``, Adagrad) and
a dense ``Linear`` reads them. ``SPARSE_CTR_DENSE=1``: the same model with a dense
``nn.Embedding(SPARSE_CTR_IDS, dim)`` (mode sum) instead, a parameter like any other,
pulled and pushed whole every step: what the sparse table is measured against.
"""
import os

import numpy as np
import torch
from torch import nn

from worker.sparse import SparseEmbedding

IDS = int(os.environ.get("SPARSE_CTR_IDS", "1000000"))
BAG = int(os.environ.get("SPARSE_CTR_BAG", "16"))
DIM = int(os.environ.get("SPARSE_CTR_DIM", "32"))
DENSE = os.environ.get("SPARSE_CTR_DENSE", "0") == "1"
BATCH_SIZE = int(os.environ.get("SPARSE_CTR_BATCH", "2048"))
SAMPLES = 1 << 24                 # never exhausted: ids come from the index
OPTIMIZER = {"name": "sgd", "lr": 0.05}   # the dense part (with SPARSE_CTR_DENSE, the table too)
SHUFFLE = False


def bag_of(index: int) -> np.ndarray:
    x = (np.uint64(index) * np.uint64(BAG) + np.arange(BAG, dtype=np.uint64)
         + np.uint64(0x9E3779B97F4A7C15))
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(31)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(29)
    return (x % np.uint64(IDS)).astype(np.int64)


class Bags(torch.utils.data.Dataset):
    def __len__(self):
        return SAMPLES

    def __getitem__(self, index):
        ids = bag_of(index)
        return torch.from_numpy(ids), torch.tensor(float(ids[0] % 7) / 7, dtype=torch.float32)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rows = (nn.EmbeddingBag(IDS, DIM, mode="sum") if DENSE else
                     SparseEmbedding("rows", DIM, init_std=0.01,
                                     optimizer={"name": "adagrad", "lr": 0.05}, mode="sum"))
        self.head = nn.Linear(DIM, 1)

    def forward(self, ids):
        return self.head(self.rows(ids)).squeeze(-1)


def build_model():
    return Model()


def build_dataset():
    return Bags()


def loss_fn(model, batch):
    ids, y = batch
    return nn.functional.mse_loss(model(ids), y)
