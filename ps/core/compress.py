"""Wire compression: float32 tensors sent as float16 or bfloat16, half the bytes.

Opt-in (``--grad-dtype``, ``--param-dtype``). Only the bytes on the wire shrink: servers keep float32
master parameters and float32 optimizer state, and sum gradients in float32, so the
rounding is that of one conversion per message, never accumulated in the state.

* ``float16``: 10 mantissa bits (relative rounding error <= 2**-11), range about
  6e-5 .. 65504; larger values become inf and are refused like any non-finite
  gradient, smaller ones lose precision (gradients of tiny magnitude are the usual
  casualty, which is why mixed-precision training scales the loss).
* ``bfloat16``: float32's 8 exponent bits and 7 mantissa bits (relative rounding
  error <= 2**-8): no overflow short of float32's own, coarser steps.

numpy has no bfloat16, so it travels as little-endian uint16: the upper half of the
float32 bit pattern, rounded to nearest-even. Decoding shifts it back up, exactly.
Pure functions over numpy arrays; the client encodes pushes and decodes pulls, the
server decodes pushes and encodes pulls.
"""
from __future__ import annotations

import numpy as np

WIRE_DTYPES = ("float32", "float16", "bfloat16")
_STORAGE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}


def storage(dtype: str) -> np.dtype:
    """The numpy dtype a wire dtype's frames are read as (bfloat16: uint16 bits)."""
    return _STORAGE[dtype]


def itemsize(dtype: str) -> int:
    return _STORAGE[dtype].itemsize


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` (float32) in the wire dtype; float32 is returned as is (no copy)."""
    if dtype == "float32":
        return x
    if dtype == "float16":
        with np.errstate(over="ignore"):        # overflow becomes inf, refused downstream
            return x.astype("<f2")
    return _encode_bfloat16(x)


def _encode_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, keep the upper
    half. Done BLOCK items at a time in one uint32 scratch, in place: the whole-array
    expression made five temporaries the size of the tensor and was about 3x slower."""
    bits = x.view(np.uint32)
    out = np.empty(x.size, dtype="<u2")
    scratch = np.empty(min(BLOCK, x.size), dtype=np.uint32)
    for i in range(0, x.size, BLOCK):
        b, t = bits[i:i + BLOCK], scratch[:min(BLOCK, x.size - i)]
        np.right_shift(b, 16, out=t)
        np.bitwise_and(t, 1, out=t)
        np.add(t, 0x7FFF, out=t)
        np.add(t, b, out=t)
        np.right_shift(t, 16, out=t)
        out[i:i + BLOCK] = t                     # the low 16 bits: exact, after the shift
        nan = np.isnan(x[i:i + BLOCK])           # rounding must not turn a NaN into inf
        if nan.any():
            out[i:i + BLOCK][nan] = 0x7FC0
    return out


BLOCK = 1 << 16                  # bfloat16 sums are decoded this many items at a time into a
                                 # 256 KiB scratch: no temporary the size of the frame


def wire_dtype(frame: np.ndarray) -> str:
    """The wire dtype an array received as ``storage(dtype)`` stands for."""
    return {"f": {4: "float32", 2: "float16"}, "u": {2: "bfloat16"}}[frame.dtype.kind][frame.itemsize]


def decode_into(out: np.ndarray, frame: np.ndarray, dtype: str) -> None:
    """Write a wire-dtype array into float32 ``out`` (same length), without a temporary."""
    if dtype == "bfloat16":        # the bits, widened and shifted up in one buffered ufunc pass
        np.left_shift(frame, np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, frame, casting="safe")


def add_into(out: np.ndarray, frame: np.ndarray, dtype: str) -> None:
    """``out += frame``, ``frame`` in the wire dtype, accumulated in float32."""
    if dtype == "bfloat16":
        scratch = np.empty(min(BLOCK, frame.size), dtype=np.float32)
        for i in range(0, frame.size, BLOCK):
            part = scratch[:min(BLOCK, frame.size - i)]
            decode_into(part, frame[i:i + BLOCK], dtype)
            np.add(out[i:i + BLOCK], part, out=out[i:i + BLOCK])
    else:                          # numpy casts float16 in its own small buffers
        np.add(out, frame, out=out, casting="safe")
