"""The wire contract: message kinds, header fields, error codes and limits.

Every message is a ZeroMQ multipart message: one msgpack header frame, then zero
or more raw little-endian payload frames (see ``ps.wire.transport`` for how tensors are cut
into frames). This module is the single place that says which kinds exist, which
header fields each must carry and with which types, and what a receiver does with
a header it does not like: raise ``ProtocolError`` with a code from ``Error``; the
event loop replies with that code, counts it, and changes no state.

``docs/protocol.md`` describes the same names for readers who do not want Python.
"""
from __future__ import annotations

from itertools import repeat

import msgpack

from ps.core.compress import WIRE_DTYPES

PROTOCOL_VERSION = 1

# --- limits (each guards against one kind of hostile or broken input) ---------------
MAX_HEADER_BYTES = 1 << 20      # a header is metadata; 1 MiB holds a lease of ~100k sample ids
MAX_FRAME_BYTES = 64 << 20      # no single payload frame may be larger (we send 8 MiB frames)
MAX_FRAMES = 4096               # payload frames per message (4096 x 8 MiB = 32 GiB, far beyond a shard)
MAX_MSGPACK_LEN = 1 << 18       # longest array/str inside a header (msgpack unpack limit)
MAX_MAP_LEN = 256               # most entries in a map inside a header
MAX_DEPTH = 16                  # deepest nesting of arrays/maps (legitimate headers use 4): a
                                # handler comparing or walking a value never meets a 1000-deep one
FRAME_BYTES = 8 << 20           # what senders use: receiving one >32 MiB frame costs a fresh mmap
                                # and page faults, measured 2-4x slower than 8 MiB frames

# --- liveness: every role's heartbeats and deadlines agree on these -------------------
HEARTBEAT_INTERVAL_S = 0.5      # how often workers and servers say they are alive
DEAD_AFTER_S = 3.0              # silence after which a member is declared dead (6 missed beats)
WAIT_LOG_S = 4 * HEARTBEAT_INTERVAL_S   # a wait longer than a few heartbeats is logged, by name

JOB_FUNCTIONS = ("<module>", "build_model", "build_dataset", "dataset", "loss_fn", "finish",
                 "param_groups", "lr_at")
                                # where a JOB_ERROR may come from: the job file's top level, its
                                # functions, and indexing or collating its dataset
MAX_JOB_ERROR_CHARS = 4096      # a JOB_ERROR's location and error: one line each, not a traceback

ALLOWED_DTYPES = WIRE_DTYPES    # what may travel in a payload (float32, float16, bfloat16 as
                                # uint16 bits: ps.core.compress); checked before any allocation. INIT
                                # is float32 only; a PUSH names its dtype, a PULL the one it wants


class Kind:
    """Message kinds. Requests go to a ROUTER; every request gets exactly one reply."""
    # control path: worker/server -> scheduler
    REGISTER = "register"       # join the cluster; the reply (sent once all roles are in) is the config
    HEARTBEAT = "heartbeat"     # "I am alive" (servers add stats, workers with message faults
                                # their net_faults counts); the reply fences and stops
    LEASE = "lease"             # worker asks for its next task of a step (or clock); steals if need be
    REPORT = "report"           # worker reports pushed tasks: loss, samples, timings, rejections
    DONE = "done"               # worker finished all steps; reply is deferred until every worker is done
    FINISHED = "finished"       # worker 0 has written the final parameters; the run may end
    STATUS = "status"           # anyone (the launcher) asks how the run is going
    JOB_ERROR = "job_error"     # worker: the job's own code raised; the first one ends the run
    NORM = "norm"               # server: its part of a BSP step's squared gradient norm (clipping);
                                # the reply, once every shard has sent its part, is the total
    # data path: worker -> server
    INIT = "init"               # worker 0 sets a shard's initial parameter values
    PULL = "pull"               # read a shard's parameters (gated by the consistency model)
    PUSH = "push"               # send a gradient sum for some tasks
    SCHEDULE = "schedule"       # the job's learning rate for every version (lr_at): float64 frames
    STATS = "stats"             # a shard's counters
    SPARSE_PULL = "sparse_pull"  # the rows of some ids of a sparse table (ps.sparse)
    SPARSE_PUSH = "sparse_push"  # gradient rows of some ids of a sparse table, for some tasks
    # replies
    OK = "ok"
    ERROR = "error"


class Error:
    """Reason codes carried by an ERROR reply (and counted by the receiver)."""
    BAD_FRAMES = "bad_frames"           # no header frame, or payload on a kind that carries none
    BAD_HEADER = "bad_header"           # not msgpack, not a map, too large or too deep
    BAD_VERSION = "bad_version"         # protocol version we do not speak
    UNKNOWN_KIND = "unknown_kind"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"             # a field of the wrong type or out of range
    BAD_DTYPE = "bad_dtype"
    BAD_PAYLOAD = "bad_payload"         # payload bytes do not match what the header claims
    NOT_READY = "not_ready"             # the shard has no parameters yet / the cluster is not configured
    TIMEOUT = "timeout"                 # a deferred request waited past its deadline
    UNKNOWN_SENDER = "unknown_sender"
    FENCED = "fenced"                   # the sender's incarnation was declared dead
    GONE = "gone"                       # a BSP version older than the shard still holds
    REREGISTER = "reregister"           # the scheduler restarted and does not know this member
                                        # yet: register again with the same role, index and inc
    RUN_OVER = "run_over"               # a worker registered once training was over: not needed;
                                        # or any worker request once a job error failed the run
    INTERNAL = "internal"               # a bug on the receiving side; the process keeps serving
    FORBIDDEN = "forbidden"             # --secure: the sender's key is not the identity it claims
    NONFINITE = "nonfinite"             # a gradient holding NaN or Inf (server --nonfinite reject)
    WRONG_SHARD = "wrong_shard"         # an INIT or PUSH cut for another shard's range


class ProtocolError(Exception):
    """A message we refuse. Carries a reason code from ``Error``; never fatal to a process."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


# Header schema: for each request kind, required field -> accepted types. Every header
# also carries "v" (protocol version), "kind" and "rid" (request id, echoed in the reply).
_INT = (int,)
_STR = (str,)
_LIST = (list,)
_MAP = (dict,)
_NUM = (int, float)
_BOOL = (bool,)
_CONTAINERS = (list, dict)

SCHEMA: dict[str, dict[str, tuple]] = {
    Kind.REGISTER: {"role": _STR},
    Kind.HEARTBEAT: {"role": _STR, "index": _INT, "inc": _INT},
    Kind.LEASE: {"worker": _INT, "inc": _INT, "step": _INT},
    Kind.REPORT: {"worker": _INT, "inc": _INT, "step": _INT, "tasks": _LIST, "rejected": _LIST,
                  "loss_sum": _NUM, "samples": _INT, "compute_s": _NUM, "wait_s": _NUM},
    Kind.DONE: {"worker": _INT, "inc": _INT},
    Kind.FINISHED: {"worker": _INT, "inc": _INT},
    Kind.STATUS: {},
    Kind.JOB_ERROR: {"worker": _INT, "inc": _INT, "function": _STR, "location": _STR,
                     "error": _STR},
    Kind.INIT: {"worker": _INT, "inc": _INT, "lo": _INT, "dtype": _STR, "size": _INT},
    Kind.PULL: {"worker": _INT, "inc": _INT, "step": _INT},
    Kind.PUSH: {"worker": _INT, "inc": _INT, "step": _INT, "tasks": _LIST, "samples": _INT,
                "step_tasks": _INT, "lo": _INT, "dtype": _STR, "size": _INT},
    Kind.NORM: {"index": _INT, "inc": _INT, "step": _INT, "sumsq": _NUM},
    Kind.SCHEDULE: {"worker": _INT, "inc": _INT, "versions": _INT},
    Kind.STATS: {},
    Kind.SPARSE_PULL: {"worker": _INT, "inc": _INT, "step": _INT, "table": _STR, "n": _INT},
    Kind.SPARSE_PUSH: {"worker": _INT, "inc": _INT, "step": _INT, "table": _STR, "n": _INT,
                       "tasks": _LIST, "samples": _INT, "step_tasks": _INT},
    Kind.OK: {},
    Kind.ERROR: {"code": _STR, "reason": _STR},
}


# Kinds that carry tensor payload frames; every other request must have none.
PAYLOAD_KINDS = frozenset({Kind.INIT, Kind.PUSH, Kind.SCHEDULE, Kind.SPARSE_PULL,
                           Kind.SPARSE_PUSH})


def check_frames(kind: str, payload: list) -> None:
    if payload and kind not in PAYLOAD_KINDS:
        raise ProtocolError(Error.BAD_FRAMES, f"{kind} carries no payload, got {len(payload)} frames")


def request_header(frames: list) -> dict:
    """The header of a request received on a ROUTER (``[identity, header, *payload]``),
    decoded and validated; raises ProtocolError like ``decode``."""
    if len(frames) < 2:
        raise ProtocolError(Error.BAD_FRAMES, "a request needs a header frame")
    if len(frames) > MAX_FRAMES + 2:
        raise ProtocolError(Error.BAD_FRAMES, f"{len(frames) - 2} payload frames > {MAX_FRAMES}")
    return decode(frames[1])


def encode(kind: str, rid: int = 0, **fields) -> bytes:
    """Pack a header frame. Fields must be msgpack types (no numpy scalars)."""
    return msgpack.packb({"v": PROTOCOL_VERSION, "kind": kind, "rid": rid, **fields},
                         use_bin_type=True)


def decode(frame) -> dict:
    """Unpack and validate a header frame; raise ProtocolError on anything unexpected.

    The layers run cheapest first and the first failure wins: size (a length, no
    parsing), strict msgpack with length limits (so a header claiming a 2**32-element
    array is refused from its length prefix, before anything is allocated), nesting
    depth, the envelope (version, kind, rid), then the schema of the kind.
    """
    raw = frame.buffer if hasattr(frame, "buffer") else frame
    check_size(raw)
    header = unpack(raw)
    check_depth(header)
    check_envelope(header)
    check_schema(header)
    return header


def check_size(raw) -> None:
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(Error.BAD_HEADER, f"header of {len(raw)} bytes > {MAX_HEADER_BYTES}")


def unpack(raw) -> dict:
    """Strict msgpack: no binary or extension values, string map keys, bounded lengths."""
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True,
            max_str_len=MAX_MSGPACK_LEN, max_bin_len=0, max_array_len=MAX_MSGPACK_LEN,
            max_map_len=MAX_MAP_LEN, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types; all mean "not a header"
        raise ProtocolError(Error.BAD_HEADER, f"undecodable header: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError(Error.BAD_HEADER, "header is not a map")
    return header


def check_depth(header: dict) -> None:
    """No array or map nested deeper than MAX_DEPTH (msgpack itself allows ~1000 levels)."""
    level, containers = 1, [header]
    while containers:
        if level > MAX_DEPTH:
            raise ProtocolError(Error.BAD_HEADER, f"header nested deeper than {MAX_DEPTH}")
        inner = []
        for c in containers:
            values = c.values() if isinstance(c, dict) else c
            # map(isinstance, ...) scans in C, a few times faster than a generator
            if any(map(isinstance, values, repeat(_CONTAINERS))):
                inner.extend(v for v in values if isinstance(v, _CONTAINERS))
        level, containers = level + 1, inner


def check_envelope(header: dict) -> None:
    if not is_int(header.get("v")) or header["v"] != PROTOCOL_VERSION:
        raise ProtocolError(Error.BAD_VERSION, f"protocol version {header.get('v')!r}, "
                                               f"expected {PROTOCOL_VERSION}")
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in SCHEMA:
        raise ProtocolError(Error.UNKNOWN_KIND, f"unknown message kind {kind!r}")
    if not is_int(header.get("rid")):
        raise ProtocolError(Error.MISSING_FIELD, "missing or non-integer 'rid'")


def check_schema(header: dict) -> None:
    """Every field the kind requires is present and of its type (an int field refuses bools)."""
    kind = header["kind"]
    for field, types in SCHEMA[kind].items():
        if field not in header:
            raise ProtocolError(Error.MISSING_FIELD, f"{kind} needs field {field!r}")
        value = header[field]
        ok = is_int(value) if types is _INT else (
            isinstance(value, types) and not (isinstance(value, bool) and bool not in types))
        if not ok:
            raise ProtocolError(Error.BAD_FIELD, f"{kind}.{field} has type {type(value).__name__}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def optional_bool(header: dict, field: str, default: bool) -> bool:
    """An optional flag: ``default`` when absent, refused when present and not a bool."""
    value = header.get(field, default)
    if not isinstance(value, bool):
        raise ProtocolError(Error.BAD_FIELD, f"{field} must be a bool")
    return value


def optional_int(header: dict, field: str, default: int, low: int, high: int) -> int:
    """An optional int in [low, high]: ``default`` when absent, refused otherwise."""
    value = header.get(field, default)
    if not is_int(value) or not low <= value <= high:
        raise ProtocolError(Error.BAD_FIELD, f"{field} must be an int in [{low}, {high}]")
    return value


def check_int_list(header: dict, field: str, limit: int) -> list[int]:
    """A list of non-negative ints (task ids, sample ids) of at most ``limit`` items."""
    values = header[field]
    if len(values) > limit or not all(is_int(v) and v >= 0 for v in values):
        raise ProtocolError(Error.BAD_FIELD, f"{field} must be at most {limit} non-negative ints")
    return values
