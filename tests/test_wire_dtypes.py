"""Wire compression end to end: float16/bfloat16 pushes and pulls, and the oracle as a bound.

The servers keep float32 master parameters and optimizer state, so compression
costs one rounding per message, never accumulated in the state. With it a BSP run
is no longer equal to single-process torch; it stays within a measured bound:
60 steps of the tiny MLP (2 workers, 2 servers, SGD with momentum) end with a
largest error, relative to each parameter tensor's largest magnitude, of

    float16 gradients and parameters    5.1e-4 measured   bound 2e-3
    bfloat16 gradients and parameters   6.4e-3 measured   bound 2e-2

and float32, named explicitly, is still exact (1e-5, as in test_oracle.py).
"""
import os
import threading

import numpy as np
import pytest

from cluster import JOBS, assert_params_close, launch, oracle
from inproc import InProcessServer

from ps.core import compress
from ps.wire import transport, validation
from ps.wire.client import RemoteError
from ps.wire.protocol import Error, Kind, ProtocolError

N = 1 << 16
JOB = os.path.join(JOBS, "tiny_mlp.py")
STEPS = 60
BOUNDS = {"float16": 2e-3, "bfloat16": 2e-2}


def grad_values(n=N, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


# -- the checks, alone --------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_check_payload_reads_two_byte_items_as_their_storage(dtype):
    x = grad_values(10)
    (chunk,) = transport.check_payload([compress.encode(x, dtype).tobytes()], dtype, 10)
    assert chunk.dtype == compress.storage(dtype) and chunk.size == 10
    with pytest.raises(ProtocolError) as info:                 # 20 bytes are 5 floats, not 10
        transport.check_payload([x[:5].tobytes()], dtype, 5)
    assert info.value.code == Error.BAD_PAYLOAD
    with pytest.raises(ProtocolError) as info:                 # INIT narrows to float32
        transport.check_payload([compress.encode(x, dtype).tobytes()], dtype, 10, ("float32",))
    assert info.value.code == Error.BAD_DTYPE


@pytest.mark.parametrize("dtype", ["float64", "int8", "f2", "", 16, None])
def test_pull_dtype_off_the_allow_list_is_refused(dtype):
    with pytest.raises(ProtocolError) as info:
        validation.check_pull({"step": 0, "dtype": dtype})
    assert info.value.code == Error.BAD_DTYPE
    assert validation.check_pull({"step": 0}) == "float32"


# -- a real server, in this process -------------------------------------------------

@pytest.fixture(params=["float16", "bfloat16"])
def compressed(request):
    srv = InProcessServer(N, grad_dtype=request.param, param_dtype=request.param)
    srv.init(np.linspace(-1, 1, N, dtype=np.float32))
    yield srv, request.param
    srv.close()


def push(srv, grad, step=0):
    """The client's push (it encodes, sends and waits) while this thread serves it."""
    outcome = []

    def client():
        try:
            outcome.append(srv.client.push(grad, step, [step], 1, 1))
        except RemoteError as exc:
            outcome.append(exc)
    t = threading.Thread(target=client)
    t.start()
    srv.serve_one()
    t.join(10)
    assert outcome, "the push got no reply"
    if isinstance(outcome[0], RemoteError):
        raise outcome[0]
    return outcome[0]


@pytest.mark.timeout(30)
def test_a_compressed_push_carries_half_the_bytes_and_is_summed_in_float32(compressed):
    srv, dtype = compressed
    grad = grad_values()
    before = srv.server.shard.params.copy()
    (reply,) = push(srv, grad)
    assert reply["applied"]
    payload = srv.received[-1][2:]
    assert sum(len(f.buffer) for f in payload) == N * 2 == grad.nbytes // 2
    decoded = np.empty_like(grad)
    compress.decode_into(decoded, compress.encode(grad, dtype), dtype)
    # SGD, lr 0.1, one sample: exactly the float32 update of the decoded gradient
    np.testing.assert_array_equal(srv.server.shard.params, before - np.float32(0.1) * decoded)


@pytest.mark.timeout(30)
def test_a_compressed_pull_carries_half_the_bytes_and_lands_decoded(compressed):
    srv, dtype = compressed
    flat = np.zeros(N, dtype=np.float32)
    pending = srv.client.pull_send(0)
    srv.serve_one()
    srv.client.pull_into(flat, 0, pending=pending)
    want = np.empty_like(flat)
    compress.decode_into(want, compress.encode(srv.server.shard.params, dtype), dtype)
    np.testing.assert_array_equal(flat, want)
    assert srv.client.pulled_bytes == flat.nbytes                # one pass into the model
    assert not srv.server.in_flight                               # a fresh buffer: no tracking


@pytest.mark.timeout(30)
def test_float16_overflow_arrives_as_inf_and_is_refused():
    srv = InProcessServer(N, grad_dtype="float16")
    try:
        srv.init(np.zeros(N, dtype=np.float32))
        grad = grad_values()
        grad[123] = 1e6                                          # beyond float16's 65504
        with pytest.raises(RemoteError) as info:
            push(srv, grad)
        assert info.value.code == Error.NONFINITE
        assert srv.server.shard.version == 0 and not srv.server.shard.params.any()
    finally:
        srv.close()


@pytest.mark.timeout(30)
def test_bad_wire_dtypes_are_refused_with_their_code():
    srv = InProcessServer(N)
    try:
        srv.init(np.zeros(N, dtype=np.float32))
        peer = srv.client.peers[0]
        cases = [
            (Kind.PULL, [], dict(step=0, dtype="float64")),
            (Kind.INIT, [np.zeros(N, np.float16).tobytes()], dict(lo=0, dtype="float16", size=N)),
            (Kind.PUSH, [np.zeros(N, np.float64).tobytes()],
             dict(step=0, tasks=[0], samples=1, step_tasks=1, lo=0, dtype="float64", size=N)),
        ]
        for kind, frames, fields in cases:
            rid = peer.send(kind, frames, worker=0, inc=7, **fields)
            srv.serve_one()
            with pytest.raises(RemoteError) as info:
                peer.recv(rid, 5.0)
            assert info.value.code == Error.BAD_DTYPE, kind
        assert srv.server.errors[Error.BAD_DTYPE] == len(cases)
    finally:
        srv.close()


# -- the oracle, as a bound ---------------------------------------------------------

def relative_error(got: dict, want: dict) -> float:
    return max(float(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()) for k in want)


@pytest.fixture(scope="module")
def reference():
    return oracle(JOB, STEPS)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compressed_bsp_run_is_within_its_bound_of_the_oracle(tmp_path, reference, dtype):
    run = launch(tmp_path, "--job", JOB, "--workers", "2", "--servers", "2", "--steps", str(STEPS),
                 "--grad-dtype", dtype, "--param-dtype", dtype)
    assert run.rc == 0, run.stderr[-3000:]
    err = relative_error(run.params, reference)
    assert 1e-6 < err < BOUNDS[dtype], err          # compressed (not exact), and within the bound
    assert run.summary["samples"] == 6 * 200 + 6 * 24


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_float32_named_explicitly_is_still_exact(tmp_path, reference):
    run = launch(tmp_path, "--job", JOB, "--workers", "2", "--servers", "2", "--steps", str(STEPS),
                 "--grad-dtype", "float32", "--param-dtype", "float32")
    assert run.rc == 0, run.stderr[-3000:]
    assert_params_close(run.params, reference, rtol=1e-5)
    assert all("copies" in s for s in run.summary["shards"])      # counted in summary.json
