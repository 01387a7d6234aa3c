"""Sharding: how a model's named tensors are laid out flat and cut across S servers.

Every worker flattens the model's parameters, in ``named_parameters`` order, into
one float32 vector. That vector is cut into S contiguous ranges of nearly equal
bytes (sizes differ by at most one element), so one large tensor may span several
servers and no server holds more than ceil(total / S) elements. Cutting by bytes
rather than by tensor is what keeps a model with one huge embedding balanced.

Pure functions; the scheduler calls them once when the cluster forms.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor's place in the flat vector: elements [offset, offset + size)."""
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return prod(self.shape)


def layout(named_shapes: list[tuple[str, list[int]]]) -> list[TensorSpec]:
    """Place tensors one after another in the flat vector, in the order given."""
    specs, offset = [], 0
    for name, shape in named_shapes:
        spec = TensorSpec(name, tuple(int(d) for d in shape), offset)
        specs.append(spec)
        offset += spec.size
    return specs


def total_size(specs: list[TensorSpec]) -> int:
    return specs[-1].offset + specs[-1].size if specs else 0


def cut(total: int, num_shards: int) -> list[tuple[int, int]]:
    """Split [0, total) into ``num_shards`` contiguous ranges of nearly equal size."""
    if num_shards < 1:
        raise ValueError("need at least one shard")
    if total < num_shards:
        raise ValueError(f"{total} parameters cannot fill {num_shards} shards")
    bounds = [k * total // num_shards for k in range(num_shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def tensors_in(specs: list[TensorSpec], lo: int, hi: int) -> list[str]:
    """Names of the tensors that overlap the flat range [lo, hi) (for logs and docs)."""
    return [s.name for s in specs if s.offset < hi and s.offset + s.size > lo]
