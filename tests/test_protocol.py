"""The wire contract (ps.wire.protocol, ps.wire.transport): what a receiver accepts and what it refuses.

A header is decoded and validated before anything is applied; each refusal carries a
reason code from ``Error``. These tests feed hand-made headers and payload frames to the
pure functions: no sockets, no processes, microseconds each.
"""
import time
import tracemalloc

import msgpack
import numpy as np
import pytest
import zmq

from ps.wire import transport, protocol
from ps.wire.protocol import (MAX_HEADER_BYTES, PROTOCOL_VERSION, SCHEMA, Error, Kind,
                         ProtocolError, check_int_list, decode, encode)

# A valid value for each accepted-types tuple in SCHEMA (identity: SCHEMA shares them).
VALID = {protocol._INT: 3, protocol._STR: "float32", protocol._LIST: [1, 2],
         protocol._MAP: {"pushes": 1}, protocol._NUM: 1.5, protocol._BOOL: True}

# Values of the wrong type for each accepted-types tuple. bool is an int in Python but
# not on the wire: a field that needs an int must refuse True.
WRONG = {protocol._INT: ["3", 3.0, True, None, [3]],
         protocol._STR: [3, 1.5, None, ["a"], {"a": 1}],
         protocol._LIST: [{"a": 1}, "ab", 3, None],
         protocol._MAP: [[1], "x", 3, None],
         protocol._NUM: ["1.5", True, None, [1]],
         protocol._BOOL: [1, "true", None]}


def valid_fields(kind: str) -> dict:
    return {field: VALID[types] for field, types in SCHEMA[kind].items()}


def refused(raw, code: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(raw)
    assert info.value.code == code, info.value
    return info.value


def pack(header) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


# -- round trip -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(SCHEMA))
def test_round_trip_every_kind(kind):
    fields = valid_fields(kind)
    header = decode(encode(kind, 17, **fields))
    assert header == {"v": PROTOCOL_VERSION, "kind": kind, "rid": 17, **fields}


def test_round_trip_keeps_extra_fields_and_big_ints():
    fields = {**valid_fields(Kind.PUSH), "step": 2**62, "extra": "x"}
    header = decode(encode(Kind.PUSH, 2**40, **fields))
    assert header["rid"] == 2**40 and header["step"] == 2**62 and header["extra"] == "x"


def test_decode_accepts_a_zmq_frame():
    # The server decodes zmq.Frame objects (recv with copy=False); no socket is needed.
    frame = zmq.Frame(encode(Kind.PULL, 5, worker=1, inc=0, step=2))
    assert decode(frame)["step"] == 2


def test_num_fields_accept_int_and_float():
    fields = valid_fields(Kind.REPORT)
    for value in (0, 7, 2.5):
        fields["loss_sum"] = value
        assert decode(encode(Kind.REPORT, 0, **fields))["loss_sum"] == value


# -- headers that are not headers -----------------------------------------------------

@pytest.mark.parametrize("raw", [b"", b"\xc1", b"not msgpack at all", b"\x81\xa1v",
                                 pack({"v": 1, "kind": "ok", "rid": 0}) + b"\x00"],
                         ids=["empty", "reserved-byte", "text", "truncated", "trailing-bytes"])
def test_non_msgpack_is_bad_header(raw):
    refused(raw, Error.BAD_HEADER)


@pytest.mark.parametrize("value", [[1, "ok", 0], "ok", 1, None, 1.5])
def test_msgpack_that_is_not_a_map_is_bad_header(value):
    refused(pack(value), Error.BAD_HEADER)


def test_non_string_map_keys_are_bad_header():
    refused(pack({1: 1, "v": 1, "kind": "ok", "rid": 0}), Error.BAD_HEADER)


def test_binary_values_are_bad_header():
    # Tensor bytes travel in payload frames, never inside a header.
    refused(pack({"v": 1, "kind": "ok", "rid": 0, "blob": b"\x00" * 8}), Error.BAD_HEADER)


def test_oversized_header_is_refused_and_the_limit_is_the_reason():
    pad = "x" * 250_000                                      # each string under MAX_MSGPACK_LEN
    small = encode(Kind.OK, 0, pad=[pad] * 3)
    assert len(small) < MAX_HEADER_BYTES
    assert decode(small)["pad"] == [pad] * 3                 # valid below the limit
    big = encode(Kind.OK, 0, pad=[pad] * 5)
    assert len(big) > MAX_HEADER_BYTES
    err = refused(big, Error.BAD_HEADER)
    assert str(len(big)) in err.reason


@pytest.mark.parametrize("raw", [b"\xdd\x80\x00\x00\x00",           # array32 of 2**31
                                 b"\xdd\xff\xff\xff\xff",           # array32 of 2**32 - 1
                                 b"\xdf\x80\x00\x00\x00",           # map32 of 2**31
                                 b"\x81\xa1v\xdd\x80\x00\x00\x00"],  # nested inside a map
                         ids=["array-2^31", "array-2^32", "map-2^31", "nested-array"])
def test_huge_length_claims_are_refused_without_allocating(raw):
    # A 2**31-slot list is 16 GiB of pointers; the unpack limits must refuse it from the
    # length prefix alone. tracemalloc sees every Python-heap allocation, lazy or not.
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        refused(raw, Error.BAD_HEADER)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert elapsed < 0.1


def test_long_but_allowed_array_is_fine_and_one_more_is_not():
    n = protocol.MAX_MSGPACK_LEN
    assert len(decode(encode(Kind.OK, 0, ids=[0] * n))["ids"]) == n
    refused(encode(Kind.OK, 0, ids=[0] * (n + 1)), Error.BAD_HEADER)


@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1a"], ids=["arrays", "maps"])
def test_deeply_nested_msgpack_is_bad_header(opener):
    raw = opener * 100_000 + b"\xc0"                         # 100k levels, well under 1 MiB
    assert len(raw) < MAX_HEADER_BYTES
    t0 = time.perf_counter()
    refused(raw, Error.BAD_HEADER)
    assert time.perf_counter() - t0 < 0.5


# -- version, kind, rid ---------------------------------------------------------------

@pytest.mark.parametrize("version", [0, 2, -1, "1", None, [1]])
def test_wrong_protocol_version(version):
    refused(pack({"v": version, "kind": "ok", "rid": 0}), Error.BAD_VERSION)


def test_missing_protocol_version():
    refused(pack({"kind": "ok", "rid": 0}), Error.BAD_VERSION)


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_the_integer_1(version):
    refused(pack({"v": version, "kind": "ok", "rid": 0}), Error.BAD_VERSION)


@pytest.mark.parametrize("kind", ["bogus", "", "PUSH", 3, None])
def test_unknown_kind(kind):
    refused(pack({"v": 1, "kind": kind, "rid": 0}), Error.UNKNOWN_KIND)


def test_missing_kind():
    refused(pack({"v": 1, "rid": 0}), Error.UNKNOWN_KIND)


@pytest.mark.parametrize("kind", [["push"], {"k": 1}], ids=["list", "map"])
def test_unhashable_kind_is_a_protocol_error(kind):
    refused(pack({"v": 1, "kind": kind, "rid": 0}), Error.UNKNOWN_KIND)


def test_missing_rid():
    refused(pack({"v": 1, "kind": "ok"}), Error.MISSING_FIELD)


@pytest.mark.parametrize("rid", ["1", 1.0, True, None, [1]])
def test_non_integer_rid(rid):
    # The code documents "missing or non-integer 'rid'" as one case.
    with pytest.raises(ProtocolError) as info:
        decode(pack({"v": 1, "kind": "ok", "rid": rid}))
    assert info.value.code in (Error.MISSING_FIELD, Error.BAD_FIELD)


# -- schema fields --------------------------------------------------------------------

FIELD_CASES = [(kind, field) for kind in sorted(SCHEMA) for field in SCHEMA[kind]]


@pytest.mark.parametrize("kind,field", FIELD_CASES, ids=[f"{k}.{f}" for k, f in FIELD_CASES])
def test_each_missing_required_field(kind, field):
    fields = valid_fields(kind)
    del fields[field]
    err = refused(encode(kind, 0, **fields), Error.MISSING_FIELD)
    assert field in err.reason


WRONG_CASES = [(kind, field, bad) for kind, field in FIELD_CASES
               for bad in WRONG[SCHEMA[kind][field]]]


@pytest.mark.parametrize("kind,field,bad", WRONG_CASES,
                         ids=[f"{k}.{f}={b!r}" for k, f, b in WRONG_CASES])
def test_each_field_of_the_wrong_type(kind, field, bad):
    fields = {**valid_fields(kind), field: bad}
    err = refused(encode(kind, 0, **fields), Error.BAD_FIELD)
    assert field in err.reason


def test_kinds_without_fields_need_only_the_envelope():
    for kind in (Kind.STATUS, Kind.STATS, Kind.OK):
        assert decode(pack({"v": 1, "kind": kind, "rid": 0}))["kind"] == kind


# -- check_int_list -------------------------------------------------------------------

def test_check_int_list_accepts_up_to_the_limit():
    assert check_int_list({"tasks": [0, 5, 2**40]}, "tasks", 3) == [0, 5, 2**40]
    assert check_int_list({"tasks": []}, "tasks", 0) == []


@pytest.mark.parametrize("values", [[1, 2, 3, 4], [-1], [0, -5], [True], [1.0], ["1"], [None],
                                    [[1]]],
                         ids=["over-limit", "negative", "negative-later", "bool", "float",
                              "str", "none", "nested"])
def test_check_int_list_refuses(values):
    with pytest.raises(ProtocolError) as info:
        check_int_list({"tasks": values}, "tasks", 3)
    assert info.value.code == Error.BAD_FIELD


# -- transport.check_payload ---------------------------------------------------------------

def f32_bytes(n: int, start: float = 0.0) -> bytes:
    return (np.arange(n, dtype="<f4") + np.float32(start)).tobytes()


def payload_refused(frames, dtype, size, code):
    with pytest.raises(ProtocolError) as info:
        transport.check_payload(frames, dtype, size)
    assert info.value.code == code, info.value


@pytest.mark.parametrize("dtype", ["float64", "object", "bf16", "int32", "<f4", "", "O"])
def test_check_payload_refuses_dtypes_off_the_allow_list(dtype):
    payload_refused([f32_bytes(4)], dtype, 4, Error.BAD_DTYPE)


@pytest.mark.parametrize("size", [3, 5, 0, -1])
def test_check_payload_total_must_match_size(size):
    payload_refused([f32_bytes(2), f32_bytes(2)], "float32", size, Error.BAD_PAYLOAD)


def test_check_payload_frame_must_be_whole_items():
    # 6 + 10 = 16 bytes = 4 floats in total, but neither frame holds whole floats.
    payload_refused([b"\x00" * 6, b"\x00" * 10], "float32", 4, Error.BAD_PAYLOAD)


def test_check_payload_too_many_frames(monkeypatch):
    monkeypatch.setattr(transport, "MAX_FRAMES", 3)
    payload_refused([f32_bytes(1)] * 4, "float32", 4, Error.BAD_FRAMES)
    assert len(transport.check_payload([f32_bytes(1)] * 3, "float32", 3)) == 3


def test_check_payload_too_many_frames_at_the_real_limit():
    frames = [b""] * (protocol.MAX_FRAMES + 1)
    payload_refused(frames, "float32", 0, Error.BAD_FRAMES)


def test_check_payload_oversized_frame(monkeypatch):
    monkeypatch.setattr(transport, "MAX_FRAME_BYTES", 64)
    assert len(transport.check_payload([f32_bytes(16)], "float32", 16)) == 1      # exactly 64 bytes
    payload_refused([f32_bytes(17)], "float32", 17, Error.BAD_PAYLOAD)      # 68 bytes


def test_check_payload_empty_payload_for_size_zero():
    assert transport.check_payload([], "float32", 0) == []


def test_check_payload_views_bytes_without_copying_read_only():
    raw = [f32_bytes(5), f32_bytes(3, start=5.0)]
    chunks = transport.check_payload(raw, "float32", 8)
    for chunk, source in zip(chunks, raw):
        assert chunk.dtype == np.dtype("<f4")
        assert np.shares_memory(chunk, np.frombuffer(source, dtype=np.uint8))
        assert not chunk.flags.writeable
    assert np.array_equal(np.concatenate(chunks), np.arange(8, dtype=np.float32))


def test_check_payload_views_zmq_frames_without_copying():
    source = np.arange(6, dtype="<f4")
    frame = zmq.Frame(source.tobytes())
    (chunk,) = transport.check_payload([frame], "float32", 6)
    assert np.shares_memory(chunk, np.frombuffer(frame.buffer, dtype=np.uint8))
    assert np.array_equal(chunk, source)


def test_check_payload_views_writable_buffer_without_copying():
    source = bytearray(f32_bytes(4))
    (chunk,) = transport.check_payload([source], "float32", 4)
    assert np.shares_memory(chunk, np.frombuffer(source, dtype=np.uint8))
    source[0:4] = np.float32(42).tobytes()                   # a view sees the change
    assert chunk[0] == 42


def test_split_output_passes_check_payload():
    flat = np.arange(10, dtype=np.float32)
    chunks = transport.check_payload(transport.split(flat, frame_bytes=16), "float32", 10)
    assert np.array_equal(np.concatenate(chunks), flat)


# -- transport.split and copy_into ---------------------------------------------------------

def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("n,frame_bytes", [(10, 16), (12, 16), (3, 1 << 20), (7, 4), (9, 18)])
def test_split_covers_the_array_in_order_with_views(n, frame_bytes):
    flat = np.arange(n, dtype=np.float32)
    views = transport.split(flat, frame_bytes=frame_bytes)
    arrays = [np.asarray(v) for v in views]
    assert all(v.nbytes <= frame_bytes for v in views)
    assert all(v.nbytes == (frame_bytes // 4) * 4 for v in views[:-1])   # full frames first
    assert all(np.shares_memory(a, flat) for a in arrays)
    assert np.array_equal(np.concatenate(arrays), flat)
    offsets = np.cumsum([0] + [a.size for a in arrays[:-1]])
    for a, off in zip(arrays, offsets):                       # each view at its own place
        assert address(a) == address(flat) + 4 * off


def test_split_default_frame_size_and_empty_array():
    flat = np.zeros(protocol.FRAME_BYTES // 4 * 2 + 1, dtype=np.float32)
    views = transport.split(flat)
    assert [v.nbytes for v in views] == [protocol.FRAME_BYTES] * 2 + [4]
    assert transport.split(np.zeros(0, dtype=np.float32)) == []


def test_split_bytes_round_trip_through_check_payload():
    # What the receiver sees: each frame as plain bytes.
    flat = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    frames = [bytes(v) for v in transport.split(flat, frame_bytes=256)]
    out = np.empty_like(flat)
    transport.copy_into(out, transport.check_payload(frames, "float32", flat.size))
    assert np.array_equal(out, flat)


def test_copy_into_places_chunks_in_order():
    out = np.full(6, -1, dtype=np.float32)
    transport.copy_into(out, [np.array([1, 2], np.float32), np.array([3, 4, 5, 6], np.float32)])
    assert out.tolist() == [1, 2, 3, 4, 5, 6]


# -- the layers, one by one -----------------------------------------------------------

def nest(depth: int, leaf=0):
    """``depth`` arrays, one inside the other (inside a header: depth + 1 levels)."""
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def test_depth_up_to_the_limit_is_fine_and_one_more_is_not():
    assert decode(encode(Kind.OK, 0, deep=nest(protocol.MAX_DEPTH - 1)))
    err = refused(encode(Kind.OK, 0, deep=nest(protocol.MAX_DEPTH)), Error.BAD_HEADER)
    assert "deeper" in err.reason


def test_depth_counts_maps_and_arrays_alike():
    deep = {}
    inner = deep
    for _ in range(protocol.MAX_DEPTH):
        inner["x"] = {}
        inner = inner["x"]
    refused(encode(Kind.OK, 0, deep=deep), Error.BAD_HEADER)
    protocol.check_depth({"layout": [["w", [16, 6]], ["b", [16]]], "optimizer": {"betas": [0.9]}})


def test_depth_check_of_a_long_flat_list_is_fast():
    header = {"ids": list(range(protocol.MAX_MSGPACK_LEN))}
    t0 = time.perf_counter()
    protocol.check_depth(header)
    assert time.perf_counter() - t0 < 0.1


def test_layers_run_cheapest_first():
    # Oversized AND not msgpack: the size says so before any parsing.
    assert "bytes >" in refused(b"\xc1" * (MAX_HEADER_BYTES + 1), Error.BAD_HEADER).reason
    # Too deep AND a bad version: the structure is refused before the envelope is read.
    raw = pack({"v": 99, "kind": "ok", "rid": 0, "deep": nest(protocol.MAX_DEPTH)})
    refused(raw, Error.BAD_HEADER)
    # A bad version AND an unknown kind AND no rid: the version is read first.
    refused(pack({"v": 99, "kind": "bogus"}), Error.BAD_VERSION)
    # An unknown kind AND no rid: the kind, then the rid, then the schema.
    refused(pack({"v": 1, "kind": "bogus"}), Error.UNKNOWN_KIND)
    refused(pack({"v": 1, "kind": "push"}), Error.MISSING_FIELD)


@pytest.mark.parametrize("layer,value,code", [
    (protocol.check_size, b"x" * (MAX_HEADER_BYTES + 1), Error.BAD_HEADER),
    (protocol.unpack, b"\x93\x01", Error.BAD_HEADER),
    (protocol.unpack, pack([1]), Error.BAD_HEADER),
    (protocol.check_depth, {"a": nest(protocol.MAX_DEPTH)}, Error.BAD_HEADER),
    (protocol.check_envelope, {"v": 1, "kind": "push"}, Error.MISSING_FIELD),
    (protocol.check_envelope, {"v": "1", "kind": "push", "rid": 0}, Error.BAD_VERSION),
    (protocol.check_schema, {"kind": "pull", "worker": 0, "inc": 0}, Error.MISSING_FIELD),
    (protocol.check_schema, {"kind": "pull", "worker": 0, "inc": 0, "step": 1.0}, Error.BAD_FIELD),
], ids=["size", "truncated", "not-a-map", "depth", "no-rid", "str-version", "missing", "float"])
def test_each_layer_on_its_own(layer, value, code):
    with pytest.raises(ProtocolError) as info:
        layer(value)
    assert info.value.code == code


def test_ext_types_are_refused():
    raw = msgpack.packb({"v": 1, "kind": "ok", "rid": 0, "x": msgpack.ExtType(1, b"\x80\x04")})
    refused(raw, Error.BAD_HEADER)


def test_pushes_and_inits_name_their_range():
    fields = valid_fields(Kind.PUSH)
    del fields["lo"]
    assert "lo" in refused(encode(Kind.PUSH, 0, **fields), Error.MISSING_FIELD).reason
    assert "lo" in SCHEMA[Kind.INIT]


@pytest.mark.parametrize("count,code", [(1, Error.BAD_FRAMES), (protocol.MAX_FRAMES + 3, Error.BAD_FRAMES)],
                         ids=["identity-only", "too-many"])
def test_request_header_checks_the_frame_count_before_decoding(count, code):
    frames = [b"ident", b"\xc1 not even msgpack"] + [b""] * (count - 2)
    with pytest.raises(ProtocolError) as info:
        protocol.request_header(frames[:count])
    assert info.value.code == code


def test_every_socket_refuses_frames_over_the_payload_limit():
    ctx = zmq.Context()
    try:
        sock = transport.make_socket(ctx, zmq.ROUTER)
        assert sock.getsockopt(zmq.MAXMSGSIZE) == protocol.MAX_FRAME_BYTES
        sock.close(linger=0)
    finally:
        ctx.term()
