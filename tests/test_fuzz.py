"""Fuzzing a live server: 10,000+ mutants of valid messages while an honest run trains.

The mutants are made from valid messages of every kind a server sees (push, clock
tick, init, pull, stats, and kinds it does not serve) by bit flips, truncation,
byte insertions, frame drops and duplications, and field swaps and odd values in
the header. The generator is seeded: the same seed gives the same bytes.

The base messages are built so that no mutant can be a *legitimate* request that
changes state (their steps and task ids are far beyond the run). A mutant that
still decodes as a push or pull a real worker could send (a worker id in range and
a step the run may reach) is not sent: it would be indistinguishable from that
worker's own request, which is what --secure is for. Sent mutants are pipelined
(sent in batches, replies drained after each): every one must be answered, every
refusal counted by its reason, the server alive, and the honest run must end with
the oracle's parameters.
"""
import os
import random

import msgpack
import numpy as np
import pytest

from cluster import JOBS, assert_params_close, oracle
from live import Background, ask, shard_ranges
from ps.wire.protocol import Kind, ProtocolError, decode, encode

STEPS = 700
# The run uses --no-steal: compared with the oracle at 1e-5 over hundreds of steps, it
# needs the same deal, so the same rounding, every run (a deal that follows measured
# speeds decides which tasks share a pass: docs/reliability.md, BSP)
JOB = os.path.join(JOBS, "tiny_mlp.py")
WORKERS = 2
SEED = 20261129
MESSAGES = 10_000
BATCH = 250                     # mutants in flight before their replies are drained
FAR = 10 ** 9
REACHABLE = 10 ** 6             # a push or pull below this step from a real worker is not sent
ODD = [None, True, -1, 0, 2 ** 64 - 1, -2 ** 63, 1.5, float("nan"), "", "x" * 300, [], [[[]]],
       {}, {"a": 1}, list(range(50)), "float64", "push"]


def bases(lo: int, size: int) -> list[list[bytes]]:
    """Valid messages that no server would apply (future steps, unknown incarnation)."""
    grad = np.ones(size, np.float32).tobytes()
    common = dict(inc=FAR, lo=lo, dtype="float32")
    return [
        [encode(Kind.PUSH, 11, worker=0, step=FAR, tasks=[FAR, FAR + 1], samples=24,
                step_tasks=2, size=size, **common), grad],
        [encode(Kind.PUSH, 12, worker=1, step=FAR, tasks=[], samples=0, step_tasks=1, size=0,
                ends_clock=True, **common)],
        [encode(Kind.INIT, 13, worker=0, size=size, **common), grad],
        [encode(Kind.PULL, 14, worker=FAR, inc=FAR, step=0)],
        [encode(Kind.STATS, 15)],
        [encode(Kind.LEASE, 16, worker=0, inc=FAR, step=0)],
    ]


def mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        i = 0 if rng.random() < 0.8 else rng.randrange(len(frames))
        raw = bytearray(frames[i])
        if op == 0 and raw:                                   # bit flips
            for _ in range(rng.randint(1, 4)):
                k = rng.randrange(len(raw) * 8)
                raw[k // 8] ^= 1 << (k % 8)
        elif op == 1:                                         # truncation
            raw = raw[:rng.randrange(len(raw) + 1)]
        elif op == 2:                                         # inserted random bytes
            k = rng.randrange(len(raw) + 1)
            raw[k:k] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and len(frames) > 1:                     # a frame dropped
            del frames[rng.randrange(len(frames))]
            continue
        elif op == 4:                                         # a frame duplicated
            frames.insert(rng.randrange(len(frames) + 1), frames[rng.randrange(len(frames))])
            continue
        elif op in (5, 6, 7):                                 # header field swaps / odd values
            try:
                header = msgpack.unpackb(bytes(frames[0]), raw=False)
                keys = sorted(header)
            except Exception:
                continue
            a, b = rng.choice(keys), rng.choice(keys)
            if op == 5:
                header[a], header[b] = header[b], header[a]
            elif op == 6:
                header[a] = rng.choice(ODD)
            else:
                del header[a]
            frames[0] = msgpack.packb(header)
            continue
        frames[i] = bytes(raw)
    return [bytes(f) for f in frames] or [b""]


def could_be_honest(frames: list[bytes]) -> bool:
    """A well-formed push or pull that a real worker could send: not ours to forge."""
    try:
        header = decode(frames[0])
    except ProtocolError:
        return False
    if header["kind"] == Kind.PULL:       # would take the place of that worker's parked pull
        return 0 <= header["worker"] < WORKERS
    return header["kind"] == Kind.PUSH and 0 <= header["worker"] < WORKERS \
        and header["step"] < REACHABLE


def mutants(seed: int, lo: int, size: int, n: int):
    rng = random.Random(seed)
    base = bases(lo, size)
    made = 0
    while made < n:
        frames = mutate(rng, rng.choice(base))
        if could_be_honest(frames):
            continue
        made += 1
        yield frames


def test_mutants_are_reproducible_from_the_seed():
    first = [b"".join(f) for f in mutants(SEED, 0, 81, 500)]
    again = [b"".join(f) for f in mutants(SEED, 0, 81, 500)]
    other = [b"".join(f) for f in mutants(SEED + 1, 0, 81, 500)]
    assert first == again and first != other
    assert len(set(first)) > 400                       # mutants, not copies of the bases


@pytest.mark.slow
@pytest.mark.timeout(170)
def test_fuzzed_messages_never_hurt_a_live_server(tmp_path):
    lo, hi = shard_ranges(JOB, 2)[0]
    with Background(tmp_path, "--job", JOB, "--steps", str(STEPS), "--workers", str(WORKERS),
                    "--servers", "2", "--no-steal", env={"TINY_MLP_DELAY_S": "0.004"}) as run:
        run.wait_roles()
        sock = run.socket("server0")
        before = run.wait_training(sock)
        replies, sent = {}, 0
        batch = []
        for frames in mutants(SEED, lo, hi - lo, MESSAGES):
            sock.send_multipart(frames)
            batch.append(frames)
            sent += 1
            if len(batch) == BATCH or sent == MESSAGES:
                for _ in batch:                          # every mutant gets one reply
                    assert sock.poll(10_000), f"no reply after {sent} mutants; server alive: " \
                                              f"{run.alive('server0')}"
                    reply = decode(sock.recv_multipart()[0])
                    key = reply["code"] if reply["kind"] == "error" else "ok"
                    replies[key] = replies.get(key, 0) + 1
                batch = []
        after = ask(sock, [encode(Kind.STATS, 2)])
        assert run.alive("server0") and after["version"] >= before["version"]
        assert sent == MESSAGES and sum(replies.values()) == MESSAGES
        refused = {code: k for code, k in replies.items() if code != "ok"}
        delta = {code: after["errors"].get(code, 0) - before["errors"].get(code, 0)
                 for code in after["errors"]}
        assert {c: d for c, d in delta.items() if d} == refused      # every refusal, by reason
        assert len(refused) >= 6, refused                            # many layers were reached
        rc, stderr = run.finish()
        assert rc == 0, stderr[-3000:]
    with np.load(tmp_path / "params.npz") as npz:
        got = {k: npz[k] for k in npz.files}
    assert_params_close(got, oracle(JOB, STEPS), rtol=1e-5)
