"""Sockets and tensor frames: how bytes leave and enter a process.

Senders cut a flat float32 array into views of at most ``FRAME_BYTES`` and hand them
to ZeroMQ with ``copy=False``; receivers wrap each frame's buffer with
``np.frombuffer`` (no copy) after checking that the bytes add up to what the header
claims. Socket options live here, each with the failure it prevents.

Used by the server, the scheduler and the client (``ps.client``), never with pickle.
"""
from __future__ import annotations

import os

import numpy as np
import zmq

from .protocol import (ALLOWED_DTYPES, FRAME_BYTES, MAX_FRAME_BYTES, MAX_FRAMES, Error,
                       ProtocolError)

MAX_MESSAGE_BYTES = MAX_FRAME_BYTES   # zmq's MAXMSGSIZE, which libzmq applies to each frame:
                                      # a larger frame is dropped with its connection before
                                      # it is allocated, so no frame this process receives can
                                      # exceed what check_payload accepts
HWM = 10_000                    # queued messages per peer before zmq blocks/drops; far above
                                # what a shard has in flight (one pull + one push per worker)


def make_socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    """A socket with the options every role uses."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)                 # closing never blocks on unsent messages
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # no frame over 64 MiB is ever allocated
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # a reply to a vanished peer raises, not vanishes
    return sock


def write_endpoint(path: str, endpoint: str) -> None:
    """Publish a bound endpoint for a launcher (atomically: it never reads half a line).

    Binding to port * and publishing what the kernel gave avoids the race of picking
    a "free" port first, which an outgoing connection can take in the meantime.
    """
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(endpoint)
    os.replace(tmp, path)


def split(flat: np.ndarray, frame_bytes: int = FRAME_BYTES) -> list[memoryview]:
    """Cut a 1-D contiguous array into views of at most ``frame_bytes`` (no copies)."""
    step = max(1, frame_bytes // flat.itemsize)
    return [memoryview(flat[i:i + step]) for i in range(0, flat.size, step)] or []


def check_payload(frames: list, dtype: str, size: int) -> list[np.ndarray]:
    """Validate payload frames against the header and view them as arrays (no copies).

    Checked before anything is allocated or applied: dtype on the allow-list, frame
    count and size limits, every frame a whole number of items, and the total equal
    to ``size`` items.
    """
    if dtype not in ALLOWED_DTYPES:
        raise ProtocolError(Error.BAD_DTYPE, f"dtype {dtype!r} not in {ALLOWED_DTYPES}")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(Error.BAD_FRAMES, f"{len(frames)} payload frames > {MAX_FRAMES}")
    itemsize = np.dtype(dtype).itemsize
    total = 0
    for frame in frames:
        n = memoryview(frame.buffer if hasattr(frame, "buffer") else frame).nbytes
        if n > MAX_FRAME_BYTES or n % itemsize:
            raise ProtocolError(Error.BAD_PAYLOAD, f"payload frame of {n} bytes")
        total += n
    if total != size * itemsize:
        raise ProtocolError(Error.BAD_PAYLOAD,
                            f"payload has {total} bytes, header says {size} x {dtype}")
    return [np.frombuffer(f.buffer if hasattr(f, "buffer") else f, dtype="<f4") for f in frames]


def copy_into(out: np.ndarray, chunks: list[np.ndarray]) -> None:
    """Copy received chunks, in order, into a flat array of exactly their total size."""
    offset = 0
    for chunk in chunks:
        out[offset:offset + chunk.size] = chunk
        offset += chunk.size
