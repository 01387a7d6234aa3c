"""Sockets and tensor frames: how bytes leave and enter a process.

Senders cut a flat float32 array into views of at most ``FRAME_BYTES`` and hand them
to ZeroMQ with ``copy=False``; receivers wrap each frame's buffer with
``np.frombuffer`` (no copy) after checking that the bytes add up to what the header
claims. A payload may travel as float16 or bfloat16 (``ps.core.compress``): encoded by
the sender, decoded into float32 by the receiver in the same pass as its one copy.
Socket options live here, each with the failure it prevents.

Used by the server, the scheduler and the client (``ps.wire.client``), never with pickle.
"""
from __future__ import annotations

import os

import numpy as np
import zmq

from ps.core import compress
from ps.faults import messages
from ps.wire.protocol import (ALLOWED_DTYPES, FRAME_BYTES, MAX_FRAME_BYTES, MAX_FRAMES, Error,
                              ProtocolError)

MAX_MESSAGE_BYTES = MAX_FRAME_BYTES   # zmq's MAXMSGSIZE, which libzmq applies to each frame:
                                      # a larger frame is dropped with its connection before
                                      # it is allocated, so no frame this process receives can
                                      # exceed what check_payload accepts
HWM = 10_000                    # queued messages per peer before zmq blocks/drops; far above
                                # what a shard has in flight (one pull + one push per worker)


def make_socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    """A socket with the options every role uses (a ``FaultySocket`` where the role
    installed message faults: ``ps.faults.messages``)."""
    sock = ctx.socket(kind, socket_class=messages.socket_class())
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


def check_payload(frames: list, dtype: str, size: int,
                  allowed: tuple = ALLOWED_DTYPES) -> list[np.ndarray]:
    """Validate payload frames against the header and view them as arrays (no copies).

    Checked before anything is allocated or applied: dtype on the allow-list (INIT
    narrows it to float32), frame count and size limits, every frame a whole number
    of items of the dtype's size (``ps.core.compress.itemsize``: 2 for float16 and for
    bfloat16, which is viewed as its uint16 bits), and the total equal to ``size`` items.
    """
    if dtype not in allowed:
        raise ProtocolError(Error.BAD_DTYPE, f"dtype {dtype!r} not in {allowed}")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(Error.BAD_FRAMES, f"{len(frames)} payload frames > {MAX_FRAMES}")
    itemsize = compress.itemsize(dtype)
    total = 0
    for frame in frames:
        n = memoryview(frame.buffer if hasattr(frame, "buffer") else frame).nbytes
        if n > MAX_FRAME_BYTES or n % itemsize:
            raise ProtocolError(Error.BAD_PAYLOAD, f"payload frame of {n} bytes")
        total += n
    if total != size * itemsize:
        raise ProtocolError(Error.BAD_PAYLOAD,
                            f"payload has {total} bytes, header says {size} x {dtype}")
    storage = compress.storage(dtype)
    return [np.frombuffer(f.buffer if hasattr(f, "buffer") else f, dtype=storage) for f in frames]


def copy_into(out: np.ndarray, chunks: list[np.ndarray]) -> None:
    """Copy received chunks, in order, into a flat array of exactly their total size,
    decoding float16/bfloat16 chunks to float32 on the way (still one pass, no temporary)."""
    offset = 0
    for chunk in chunks:
        part = out[offset:offset + chunk.size]
        if chunk.dtype == out.dtype:
            part[:] = chunk
        else:
            compress.decode_into(part, chunk, compress.wire_dtype(chunk))
        offset += chunk.size


def pull_frames(params: np.ndarray, dtype: str) -> tuple[list, bool]:
    """A PULL reply's payload: the frames, and whether they are views of ``params``.

    float32: views of the live buffer (zero-copy; the server tracks the send, since
    the buffer must not change until zmq has sent it). float16/bfloat16: encoding
    needs a fresh buffer of half the size, which nobody else holds, so the reply
    needs no tracking and the live buffer may change at once.
    """
    encoded = compress.encode(params, dtype)
    return split(encoded), encoded is params
