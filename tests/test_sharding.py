"""Sharding (ps.core.sharding): the flat layout of named tensors and its cut into S ranges.

The promise: S contiguous ranges that cover [0, total) exactly, of nearly equal size
(differing by at most one element), so one huge tensor is spread over several servers
instead of loading one of them. Pure functions, checked exhaustively on small inputs.
"""
import math

import pytest

from ps.core.sharding import TensorSpec, cut, layout, tensors_in, total_size

# A model with one tensor far larger than the rest: an embedding plus a small MLP head.
SKEWED = [("embed.weight", [50_000, 64]), ("fc1.weight", [128, 64]), ("fc1.bias", [128]),
          ("fc2.weight", [10, 128]), ("fc2.bias", [10])]


def check_cover(ranges, total):
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    for (lo, hi), (nlo, _) in zip(ranges, ranges[1:]):
        assert hi == nlo                                  # contiguous, no gap, no overlap
    assert all(lo < hi for lo, hi in ranges)              # no empty shard


CUT_CASES = [(total, shards) for total in [1, 2, 7, 8, 9, 100, 101, 3_217_290]
             for shards in range(1, 9) if total >= shards]


@pytest.mark.parametrize("total,shards", CUT_CASES)
def test_cut_covers_contiguously_and_evenly(total, shards):
    ranges = cut(total, shards)
    assert len(ranges) == shards
    check_cover(ranges, total)
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1
    assert max(sizes) <= math.ceil(total / shards)


@pytest.mark.parametrize("shards", range(1, 9))
def test_one_huge_tensor_does_not_unbalance_the_shards(shards):
    specs = layout(SKEWED)
    total = total_size(specs)
    sizes = [hi - lo for lo, hi in cut(total, shards)]
    assert max(sizes) <= 1.05 * total / shards
    # Cutting by tensor instead would put the whole embedding on one shard:
    assert specs[0].size > 0.99 * total


@pytest.mark.parametrize("shards", [2, 3, 4, 8])
def test_a_single_tensor_spans_several_shards(shards):
    specs = layout(SKEWED)
    ranges = cut(total_size(specs), shards)
    holders = [k for k, (lo, hi) in enumerate(ranges)
               if "embed.weight" in tensors_in(specs, lo, hi)]
    assert holders == list(range(shards))                 # >99% of the bytes: on every shard
    # The small tail tensors all land on the last shard.
    assert tensors_in(specs, *ranges[-1])[-4:] == [n for n, _ in SKEWED[1:]]


def test_cut_one_element_per_shard():
    assert cut(3, 3) == [(0, 1), (1, 2), (2, 3)]


def test_cut_single_shard_is_everything():
    assert cut(12345, 1) == [(0, 12345)]


@pytest.mark.parametrize("shards", [0, -1])
def test_cut_refuses_fewer_than_one_shard(shards):
    with pytest.raises(ValueError):
        cut(10, shards)


@pytest.mark.parametrize("total,shards", [(0, 1), (2, 3), (7, 8)])
def test_cut_refuses_more_shards_than_elements(total, shards):
    with pytest.raises(ValueError):
        cut(total, shards)


def test_layout_places_tensors_one_after_another():
    specs = layout(SKEWED)
    assert [s.name for s in specs] == [n for n, _ in SKEWED]
    assert [s.shape for s in specs] == [(50_000, 64), (128, 64), (128,), (10, 128), (10,)]
    expected_offsets = [0, 3_200_000, 3_208_192, 3_208_320, 3_209_600]
    assert [s.offset for s in specs] == expected_offsets
    assert [s.size for s in specs] == [3_200_000, 8192, 128, 1280, 10]
    assert total_size(specs) == 3_209_610


def test_layout_scalar_and_empty():
    specs = layout([("scale", []), ("w", (2, 3))])
    assert specs == [TensorSpec("scale", (), 0), TensorSpec("w", (2, 3), 1)]
    assert specs[0].size == 1 and total_size(specs) == 7
    assert layout([]) == [] and total_size([]) == 0


def test_layout_shapes_become_int_tuples():
    (spec,) = layout([("w", [2.0, 3])])
    assert spec.shape == (2, 3) and all(type(d) is int for d in spec.shape)


def test_tensors_in_uses_half_open_ranges():
    specs = layout([("a", [4]), ("b", [4]), ("c", [4])])   # a:[0,4) b:[4,8) c:[8,12)
    assert tensors_in(specs, 0, 4) == ["a"]
    assert tensors_in(specs, 3, 5) == ["a", "b"]
    assert tensors_in(specs, 4, 8) == ["b"]
    assert tensors_in(specs, 7, 9) == ["b", "c"]
    assert tensors_in(specs, 0, 12) == ["a", "b", "c"]
    assert tensors_in(specs, 5, 6) == ["b"]
    assert tensors_in(specs, 12, 20) == []
