"""Wire compression: rounding bounds, exact round trips, special values, against torch."""
import numpy as np
import pytest
import torch

from ps.core import compress


def values(n=10_000, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * np.exp(rng.uniform(-8, 8, n))).astype(np.float32)


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_encoding_rounds_exactly_as_torch_does(dtype, torch_dtype):
    x = values()
    x[:4] = [0.0, -0.0, 1e-30, 3.0e38]
    ours = np.empty_like(x)
    compress.decode_into(ours, compress.encode(x, dtype), dtype)
    with np.errstate(over="ignore"):
        theirs = torch.from_numpy(x).to(torch_dtype).to(torch.float32).numpy()
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("dtype,bound", [("float16", 2.0 ** -11), ("bfloat16", 2.0 ** -8)])
def test_relative_error_is_bounded_in_the_normal_range(dtype, bound):
    x = values()
    x = x[(np.abs(x) > 1e-4) & (np.abs(x) < 6e4)]          # inside float16's normal range
    back = np.empty_like(x)
    compress.decode_into(back, compress.encode(x, dtype), dtype)
    assert np.max(np.abs(back - x) / np.abs(x)) <= bound


def test_half_the_bytes_and_float32_is_not_copied():
    x = values(1000)
    assert compress.encode(x, "float32") is x
    for dtype in ("float16", "bfloat16"):
        assert compress.encode(x, dtype).nbytes == x.nbytes // 2 == 1000 * compress.itemsize(dtype)


def test_non_finite_values_stay_non_finite():
    x = np.array([np.nan, np.inf, -np.inf, 1e6], dtype=np.float32)
    f16 = np.empty_like(x)
    compress.decode_into(f16, compress.encode(x, "float16"), "float16")
    assert np.isnan(f16[0]) and np.isinf(f16[1:]).all()    # 1e6 overflows float16
    bf16 = np.empty_like(x)
    compress.decode_into(bf16, compress.encode(x, "bfloat16"), "bfloat16")
    assert np.isnan(bf16[0]) and np.isinf(bf16[1:3]).all() and bf16[3] == pytest.approx(1e6, rel=2 ** -8)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_add_into_accumulates_in_float32(dtype):
    x, y = values(500, 1), values(500, 2)
    acc = x.copy()
    wire = compress.encode(y, dtype)
    compress.add_into(acc, wire, dtype)
    decoded = np.empty_like(y)
    compress.decode_into(decoded, wire, dtype)
    np.testing.assert_array_equal(acc, x + decoded)
    assert acc.dtype == np.float32
