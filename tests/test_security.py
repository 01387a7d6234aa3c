"""--secure: CurveZMQ, an allow-list of keys, and identities bound to keys.

Against a live secure cluster training honestly: a plaintext client and a client
whose key is not on the allow-list get nothing through (no reply, nothing counted);
a worker's key speaking as another worker is refused with ``forbidden`` by the
servers and the scheduler; the run ends with the oracle's parameters, and a secure
run gives bit for bit the parameters of a plain one. Then the pure parts: key
generation, who a header claims to be, loopback detection, the layered checks of
``ps.wire.validation`` and the bounded refusal log.
"""
import logging
import os
import stat

import numpy as np
import pytest
import zmq
import zmq.auth

from cluster import JOBS, assert_params_close, launch, oracle
from live import Background, ask, shard_ranges
from ps.security import curve, keys
from ps.wire import validation
from ps.wire.protocol import Error, Kind, ProtocolError, encode

STEPS = 900
# The run uses --no-steal: compared with the oracle at 1e-5 over hundreds of steps, it
# needs the same deal, so the same rounding, every run (a deal that follows measured
# speeds decides which tasks share a pass: docs/reliability.md, BSP)
JOB = os.path.join(JOBS, "tiny_mlp.py")


def curve_options(keydir: str, name: str, server: str, secret_file: str | None = None):
    """Set a socket up as a CURVE client holding ``name``'s key pair."""
    def setup(sock):
        public, secret = zmq.auth.load_certificate(
            secret_file or os.path.join(keydir, "private", f"{name}.key_secret"))
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey, _ = zmq.auth.load_certificate(
            os.path.join(keydir, "public", f"{server}.key"))
    return setup


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_secure_cluster_admits_only_its_keys_and_binds_identities(tmp_path):
    keydir = str(tmp_path / "keys")
    lo, hi = shard_ranges(JOB, 2)[0]
    stranger_dir = tmp_path / "stranger"
    stranger_dir.mkdir()
    _, stranger = zmq.auth.create_certificates(str(stranger_dir), "stranger")
    with Background(tmp_path, "--job", JOB, "--steps", str(STEPS), "--workers", "2",
                    "--servers", "2", "--secure", "--no-steal", env={"TINY_MLP_DELAY_S": "0.005"}) as run:
        run.wait_roles()
        observer = run.socket("server0", curve_options(keydir, "observer", "server0"))
        before = run.wait_training(observer)

        # Worker 1's key may not speak as worker 0 (servers and scheduler alike), nor the
        # observer's as any worker; as itself, worker 1 gets past the check to the next one.
        w1 = run.socket("server0", curve_options(keydir, "worker1", "server0"))
        spoof = [encode(Kind.PUSH, 1, worker=0, inc=1, step=10 ** 9, tasks=[10 ** 9], samples=1,
                        step_tasks=2, lo=lo, dtype="float32", size=hi - lo),
                 np.zeros(hi - lo, np.float32).tobytes()]
        assert ask(w1, spoof)["code"] == Error.FORBIDDEN
        assert ask(w1, [encode(Kind.PULL, 2, worker=0, inc=1, step=0)])["code"] == Error.FORBIDDEN
        assert ask(observer, spoof)["code"] == Error.FORBIDDEN
        own = [encode(Kind.PUSH, 3, worker=1, inc=10 ** 6, step=10 ** 9, tasks=[10 ** 9],
                      samples=1, step_tasks=2, lo=lo, dtype="float32", size=hi - lo), spoof[1]]
        assert ask(w1, own)["code"] == Error.BAD_FIELD            # a future step, not forbidden
        w1s = run.socket("scheduler", curve_options(keydir, "worker1", "scheduler"))
        assert ask(w1s, [encode(Kind.LEASE, 4, worker=0, inc=1, step=0)])["code"] == Error.FORBIDDEN
        assert ask(w1s, [encode(Kind.HEARTBEAT, 5, role="server", index=0, inc=1)])["code"] \
            == Error.FORBIDDEN
        assert ask(w1s, [encode(Kind.STATUS, 6)])["kind"] == "ok"

        # Nothing gets through without a key on the allow-list: the handshake itself is
        # refused (the probes see it fail), so nothing is answered or counted.
        for role in ("server0", "scheduler"):
            plain = run.probe(role)
            assert plain.outcome([encode(Kind.STATS if role != "scheduler" else Kind.STATUS, 1)]) \
                == "refused", plain.events
            unknown = run.probe(role, curve_options(keydir, "stranger", role, secret_file=stranger))
            assert unknown.outcome([encode(Kind.PULL, 1, worker=0, inc=1, step=0)]) == "refused"
            assert unknown.outcome([encode(Kind.STATS if role != "scheduler" else Kind.STATUS, 2)]) \
                == "refused", unknown.events
            plain.close()
            unknown.close()

        after = ask(observer, [encode(Kind.STATS, 7)])
        delta = {c: after["errors"].get(c, 0) - before["errors"].get(c, 0) for c in after["errors"]}
        assert {c: d for c, d in delta.items() if d} == {Error.FORBIDDEN: 3, Error.BAD_FIELD: 1}
        rc, stderr = run.finish()
        assert rc == 0, stderr[-3000:]
    with np.load(tmp_path / "params.npz") as npz:
        got = {k: npz[k] for k in npz.files}
    assert_params_close(got, oracle(JOB, STEPS), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_secure_run_gives_the_parameters_of_a_plain_run(tmp_path):
    # --no-steal: who computes which task, and so the rounding, is then the same in every
    # run (with stealing, deals follow measured speeds: docs/reliability.md, BSP)
    args = ["--job", JOB, "--steps", "60", "--workers", "2", "--servers", "2", "--no-steal"]
    plain = launch(tmp_path / "plain", *args)
    secure = launch(tmp_path / "secure", *args, "--secure")
    assert plain.rc == 0 and secure.rc == 0, secure.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "secure" / "keys" / "public")) == [
        "observer.key", "scheduler.key", "server0.key", "server1.key", "worker0.key", "worker1.key"]
    for name, value in plain.params.items():
        assert np.array_equal(secure.params[name], value), name


# -- keys and identities (no sockets) -------------------------------------------------

def test_keys_are_made_once_with_private_secrets(tmp_path):
    made = keys.generate(str(tmp_path), servers=1, workers=2)
    assert made == ["scheduler", "observer", "server0", "worker0", "worker1"]
    secret = tmp_path / "private" / "worker1.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    first = secret.read_bytes()
    assert keys.generate(str(tmp_path), servers=2, workers=2) == ["server1"]   # only what is missing
    assert secret.read_bytes() == first
    ring = curve.Keyring(str(tmp_path), "worker1")
    assert sorted(ring.names.values()) == ["observer", "scheduler", "server0", "server1",
                                           "worker0", "worker1"]
    assert ring.names[ring.public_key] == "worker1"
    with pytest.raises(FileNotFoundError):
        curve.Keyring(str(tmp_path), "worker9")


@pytest.mark.parametrize("header,claim", [
    ({"kind": "push", "worker": 3}, "worker3"),
    ({"kind": "pull", "worker": 0}, "worker0"),
    ({"kind": "lease", "worker": 1}, "worker1"),
    ({"kind": "heartbeat", "role": "server", "index": 2}, "server2"),
    ({"kind": "register", "role": "server", "shard": 1}, "server1"),
    ({"kind": "register", "role": "server", "index": 1}, "server1"),
    ({"kind": "register", "role": "worker", "worker": 4}, "worker4"),
    # registering again after a scheduler restart: the scheduler acts on index, so index
    # is the claim, whatever a worker field says
    ({"kind": "register", "role": "worker", "worker": 1, "index": 0, "inc": 3}, "worker0"),
    ({"kind": "stats"}, None),
    ({"kind": "status"}, None),
])
def test_who_a_header_claims_to_be(header, claim):
    assert curve.claimed(header) == claim


def test_check_sender_is_a_no_op_in_plaintext():
    curve.use(None)
    curve.check_sender(zmq.Frame(b"x"), {"kind": "push", "worker": 0})


def test_check_sender_refuses_a_frame_without_a_key(tmp_path):
    keys.generate(str(tmp_path), 1, 1)
    curve.use(curve.Keyring(str(tmp_path), "server0"))
    try:
        with pytest.raises(ProtocolError) as info:
            curve.check_sender(zmq.Frame(b"x"), {"kind": "push", "worker": 0})
        assert info.value.code == Error.FORBIDDEN
    finally:
        curve.use(None)


@pytest.mark.parametrize("endpoint,loopback", [
    ("tcp://127.0.0.1:*", True), ("tcp://127.0.0.5:5555", True), ("tcp://localhost:1", True),
    ("tcp://[::1]:5555", True), ("ipc:///tmp/x", True), ("tcp://0.0.0.0:5555", False),
    ("tcp://*:5555", False), ("tcp://10.0.0.7:5555", False), ("tcp://eth0:5555", False)])
def test_loopback_endpoints(endpoint, loopback):
    assert curve.is_loopback(endpoint) == loopback


def test_binding_beyond_loopback_without_secure_warns(caplog):
    curve.use(None)
    with caplog.at_level(logging.WARNING, logger="ps.security"):
        curve.warn_if_exposed("tcp://0.0.0.0:5555", "server")
        curve.warn_if_exposed("tcp://127.0.0.1:5555", "server")
    assert len(caplog.records) == 1 and "--secure" in caplog.records[0].getMessage()


# -- ps.wire.validation --------------------------------------------------------------------

def code_of(fn, *args) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args)
    return info.value.code


def test_range_must_be_this_shards():
    validation.check_range({"lo": 40}, 40, 80)
    assert code_of(validation.check_range, {"lo": 0}, 40, 80) == Error.WRONG_SHARD


def test_ssp_window_refuses_future_clocks_only():
    validation.check_window(7, [5, 3], "ssp", 2)             # max clock + s
    validation.check_window(0, [5, 3], "ssp", 2)             # stale: dedupe decides
    assert code_of(validation.check_window, 8, [5, 3], "ssp", 2) == Error.BAD_FIELD
    validation.check_window(10 ** 9, [5, 3], "asp", 0)       # ASP has no window
    validation.check_window(10 ** 9, [5, 3], "bsp", 0)       # BSP: ps.core.shard refuses it


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_gradients_rejected_or_skipped(bad):
    grad = np.ones(6, np.float32)
    grad[4] = bad
    chunks = [grad[:3], grad[3:]]
    counters = {}
    assert code_of(validation.screen_gradient, chunks, 6, "reject", counters) == Error.NONFINITE
    from collections import Counter
    counters = Counter()
    (zero,) = validation.screen_gradient(chunks, 6, "skip", counters)
    assert zero.dtype == np.float32 and not zero.any() and zero.size == 6
    assert counters == {"nonfinite_skipped": 1}
    fine = [np.ones(3, np.float32)]
    assert validation.screen_gradient(fine, 3, "reject", counters) is fine


def test_huge_finite_gradients_are_finite():
    # The float32 scan squares and sums (one BLAS pass); a sum that overflows is settled
    # exactly, so a finite gradient of huge values still passes, and Inf anywhere fails.
    grad = np.ones(1000, np.float32)
    grad[[3, 700]] = [3e38, -1e30]
    assert validation.finite([grad[:500], grad[500:]])
    for bad in (np.inf, -np.inf, np.nan):
        worse = grad.copy()
        worse[999] = bad
        assert not validation.finite([worse[:500], worse[500:]])


def test_nonfinite_bfloat16_bits():
    inf_bits = np.array([0x3F80, 0x7F80], np.uint16)           # 1.0, +inf
    nan_bits = np.array([0xFFC1], np.uint16)
    assert validation.finite([np.array([0x3F80, 0xBF80], np.uint16)])
    assert not validation.finite([inf_bits]) and not validation.finite([nan_bits])


def test_refusal_log_is_bounded(caplog):
    refusals = validation.RefusalLog(logging.getLogger("test.refusals"), burst=3, window_s=10)
    with caplog.at_level(logging.INFO, logger="test.refusals"):
        for i in range(1000):
            refusals.note(ProtocolError(Error.BAD_HEADER, f"garbage {i}"), now=1.0)
        refusals.note(ProtocolError(Error.BAD_FIELD, "later"), now=12.0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 + 1 + 1
    assert "997 more refusals" in lines[3] and "bad_header" in lines[3]
