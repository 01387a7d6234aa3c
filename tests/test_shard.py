"""The pure core of a server (ps.core.shard.Shard): aggregation, the consistency gate, dedupe.

Each test drives a Shard the way the server's event loop does (init, push, pull_ready,
note_read) with payloads shaped as the wire delivers them (read-only float32 views of
received bytes, cut into several frames), and checks what DESIGN.md promises:

* BSP: one optimizer step per global step, on the sample-weighted mean gradient, applied
  exactly when the step's last task arrives; compared with plain numpy SGD.
* SSP(s): each push applied on arrival as the mean over its own samples; a read at clock
  c is allowed exactly when every worker's clock is >= c - s.
* Exactly once: a task's gradient is never applied twice; a refused push changes nothing.
"""
import numpy as np
import pytest

from ps.core import shard as shard_module
from ps.wire import transport
from ps.core.optim import CHUNK, make_optimizer
from ps.wire.protocol import Error, ProtocolError
from ps.core.shard import Shard

LR = 0.1
SGD = {"name": "sgd", "lr": LR}
SIZE = 300                      # not a multiple of the frame size below: the last frame is short
FRAME_BYTES = 256               # 64 floats per frame, so every payload arrives as 5 frames


def received(values: np.ndarray) -> list[np.ndarray]:
    """What the server hands to Shard: read-only views of the received frames."""
    flat = np.ascontiguousarray(values, dtype=np.float32)
    frames = [bytes(v) for v in transport.split(flat, frame_bytes=FRAME_BYTES)]
    return transport.check_payload(frames, "float32", flat.size)


def sgd(params: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """The oracle: one plain SGD step in float32, params - lr * grad."""
    return (params - np.float32(LR) * grad).astype(np.float32)


def close(actual, expected):
    # Same float32 operations in the same order; the tolerance only leaves room for the
    # optimizer's rounding choices (see tests/test_optim.py on FMA), about one ulp.
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def make(mode: str, workers: int, staleness: int = 0, seed: int = 0) -> tuple[Shard, np.ndarray]:
    shard = Shard(SIZE, SGD, mode, staleness, workers)
    p0 = np.random.default_rng(seed).standard_normal(SIZE).astype(np.float32)
    assert shard.init(received(p0)) is True
    return shard, p0


def grad_sums(count: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SIZE).astype(np.float32) for _ in range(count)]


def snapshot(shard: Shard) -> dict:
    return {"params": shard.params.copy(), "grad": shard.grad.copy(),
            "version": shard.version, "clocks": list(shard.clocks),
            "seen": set(shard.step_tasks_seen), "step_samples": shard.step_samples,
            "applied": set(shard.applied), "pushes_applied": shard.pushes_applied,
            "tasks_applied": shard.tasks_applied,
            "max_staleness": shard.max_staleness, "grad_is_prev": shard.grad_is_prev}


def assert_unchanged(shard: Shard, before: dict) -> None:
    after = snapshot(shard)
    assert np.array_equal(after.pop("params"), before["params"])
    assert np.array_equal(after.pop("grad"), before["grad"])
    assert after == {k: v for k, v in before.items() if k not in ("params", "grad")}


def refuse(code: str, call, *args):
    with pytest.raises(ProtocolError) as info:
        call(*args)
    assert info.value.code == code, info.value


# -- BSP ------------------------------------------------------------------------------

# One step of 6 tasks dealt round-robin to 3 workers; each worker pushes the gradient sum
# over its two tasks with their sample count (tasks of unequal size: weighting matters).
BSP_PUSHES = {0: ([0, 3], 5), 1: ([1, 4], 8), 2: ([2, 5], 3)}   # worker -> (tasks, samples)
STEP_TASKS = 6


def bsp_step(step: int, seed: int):
    """The step's pushes (worker, tasks, samples, gradient sum), task ids offset per step."""
    sums = grad_sums(3, seed)
    return [(w, [step * STEP_TASKS + t for t in tasks], n, sums[w])
            for w, (tasks, n) in BSP_PUSHES.items()]


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_bsp_applies_once_when_the_last_task_arrives(order):
    shard, p0 = make("bsp", 3)
    pushes = bsp_step(0, seed=1)
    for i, w in enumerate(order):
        _, tasks, n, g = pushes[w]
        assert shard.pull_ready(0) and not shard.pull_ready(1)
        assert shard.push(w, 0, tasks, n, STEP_TASKS, received(g)) is True
        if i < len(order) - 1:                                # still aggregating: nothing moves
            assert np.array_equal(shard.params, p0)
            assert shard.version == 0
    total = np.zeros(SIZE, np.float32)
    for w in order:                                           # the sum, in arrival order
        total += pushes[w][3]
    mean = total / np.float32(sum(n for _, _, n, _ in pushes))   # / 16 samples, not / 3 pushes
    close(shard.params, sgd(p0, mean))
    assert shard.version == 1
    assert shard.pull_ready(1) and not shard.pull_ready(2)
    assert shard.clocks == [1, 1, 1]
    assert shard.stats()["pushes_applied"] == 3
    assert shard.stats()["tasks_applied"] == sum(len(tasks) for _, tasks, _, _ in pushes)
    assert not shard.step_tasks_seen and shard.step_samples == 0   # the next step starts afresh


def test_bsp_several_steps_match_sgd_on_the_global_batches():
    shard, p = make("bsp", 3)
    for step in range(4):
        pushes = bsp_step(step, seed=10 + step)
        for w, tasks, n, g in pushes:
            assert not shard.pull_ready(step + 1)
            shard.push(w, step, tasks, n, STEP_TASKS, received(g))
        total = pushes[0][3] + pushes[1][3] + pushes[2][3]
        p = sgd(p, total / np.float32(16))
        close(shard.params, p)
        assert shard.version == step + 1
    assert shard.duplicates_rejected == 0


def test_bsp_single_worker_single_task_is_one_sgd_step_on_the_mean():
    shard, p0 = make("bsp", 1)
    (g,) = grad_sums(1)
    shard.push(0, 0, [0], 4, 1, received(g))
    close(shard.params, sgd(p0, g / np.float32(4)))


def test_bsp_step_completed_by_one_push_reads_its_frames_and_keeps_the_old_version(monkeypatch):
    # One push holding the step's whole batch is stepped straight from the received
    # frames (never copied into the aggregation buffer): the same parameters as two
    # pushes summed there, and the old version lands in the buffer.
    shard, p0 = make("bsp", 2)
    g = grad_sums(1)[0]
    frames = received(g)
    with monkeypatch.context() as m:
        m.setattr(shard_module, "CHUNK", FRAME_BYTES // 4)    # frames as big as a chunk
        m.setattr(shard_module, "decode_into", lambda *a: pytest.fail("copied into the buffer"))
        shard.push(0, 0, [0, 1], 6, 2, frames)
    expected = p0.copy()
    make_optimizer(SGD, SIZE).step(expected, g.copy(), divide_by=6)   # as the buffer path did
    np.testing.assert_array_equal(shard.params, expected)
    close(shard.params, sgd(p0, g / np.float32(6)))
    assert shard.version == 1 and shard.grad_is_prev
    assert np.array_equal(shard.params_for(0)[0], p0)
    assert np.array_equal(np.concatenate(frames), g)             # the frames are only read
    split, _ = make("bsp", 2)
    split.push(0, 0, [0], 2, 2, received(g / np.float32(3)))
    split.push(1, 0, [1], 4, 2, received(g * np.float32(2 / 3)))
    close(shard.params, split.params)


@pytest.mark.parametrize("mode", ["bsp", "asp"])
def test_frames_smaller_than_a_chunk_are_gathered_first(mode, monkeypatch):
    # Read in place, a push of many tiny frames would run the optimizer's loop once per
    # frame; such a push is gathered into the buffer first, with the same result.
    monkeypatch.setattr(shard_module, "CHUNK", 2 * FRAME_BYTES // 4)   # frames: half a chunk
    shard, p0 = make(mode, 1)
    read = []                              # the pieces the optimizer was given
    real = shard.optimizer.step

    def step(params, grad, **kwargs):
        read.append(grad if isinstance(grad, list) else [grad])
        real(params, grad, **kwargs)
    shard.optimizer.step = step
    g = grad_sums(1)[0]
    frames = received(g)
    shard.push(0, 0, [0], 4, 1, frames)
    assert len(frames) > 1 and [p is shard.grad for p in read[0]] == [True]   # gathered
    expected = p0.copy()
    make_optimizer(SGD, SIZE).step(expected, g.copy(), divide_by=4)
    np.testing.assert_array_equal(shard.params, expected)


def test_bsp_duplicate_task_in_the_same_step_is_rejected_and_changes_nothing():
    shard, p0 = make("bsp", 3)
    (w0, t0, n0, g0), (w1, t1, n1, g1), (w2, t2, n2, g2) = bsp_step(0, seed=1)
    shard.push(w0, 0, t0, n0, STEP_TASKS, received(g0))
    before = snapshot(shard)
    # A retry of worker 0's push, and a push overlapping it by one task (a steal gone wrong).
    assert shard.push(w0, 0, t0, n0, STEP_TASKS, received(g0)) is False
    assert shard.push(w1, 0, [t0[1], t1[0]], n1, STEP_TASKS, received(g1)) is False
    assert shard.duplicates_rejected == 2
    assert_unchanged(shard, before)
    # The step still completes with exactly the genuine pushes.
    shard.push(w1, 0, t1, n1, STEP_TASKS, received(g1))
    shard.push(w2, 0, t2, n2, STEP_TASKS, received(g2))
    close(shard.params, sgd(p0, (g0 + g1 + g2) / np.float32(16)))
    assert shard.version == 1


def test_bsp_push_for_a_completed_step_is_rejected_as_duplicate():
    shard, _ = make("bsp", 3)
    pushes = bsp_step(0, seed=1)
    for w, tasks, n, g in pushes:
        shard.push(w, 0, tasks, n, STEP_TASKS, received(g))
    before = snapshot(shard)
    w, tasks, n, g = pushes[1]
    assert shard.push(w, 0, tasks, n, STEP_TASKS, received(g)) is False    # a late retry
    assert shard.push(w, 0, [99], n, STEP_TASKS, received(g)) is False     # even unseen ids
    assert shard.duplicates_rejected == 2
    assert_unchanged(shard, before)


def test_bsp_push_for_a_future_step_is_a_protocol_error():
    shard, _ = make("bsp", 3)
    before = snapshot(shard)
    (g,) = grad_sums(1)
    refuse(Error.BAD_FIELD, shard.push, 0, 1, [6], 2, STEP_TASKS, received(g))
    assert_unchanged(shard, before)
    assert shard.duplicates_rejected == 0


def test_bsp_more_tasks_than_the_step_has_is_a_protocol_error():
    shard, _ = make("bsp", 2)
    g0, g1 = grad_sums(2)
    refuse(Error.BAD_FIELD, shard.push, 0, 0, [0, 1, 2], 3, 2, received(g0))
    shard.push(0, 0, [0], 1, 2, received(g0))
    before = snapshot(shard)
    refuse(Error.BAD_FIELD, shard.push, 1, 0, [1, 2], 2, 2, received(g1))
    assert_unchanged(shard, before)


def test_bsp_push_disagreeing_on_the_step_s_task_count_is_refused():
    # The first push says the step has 3 tasks; one claiming 2 (which it alone would
    # complete) must not end the step on part of the global batch.
    shard, _ = make("bsp", 3)
    g0, g1, g2 = grad_sums(3)
    shard.push(0, 0, [0], 1, 3, received(g0))
    before = snapshot(shard)
    refuse(Error.BAD_FIELD, shard.push, 1, 0, [1], 1, 2, received(g1))
    refuse(Error.BAD_FIELD, shard.push, 1, 0, [1], 1, 4, received(g1))
    assert_unchanged(shard, before)
    assert shard.version == 0
    shard.push(1, 0, [1], 1, 3, received(g1))
    shard.push(2, 0, [2], 1, 3, received(g2))
    assert shard.version == 1
    # The next step is counted afresh from its own first push.
    shard.push(0, 1, [3, 4], 2, 2, received(g0))
    assert shard.version == 2


def test_bsp_zero_sample_push_changes_nothing():
    shard, _ = make("bsp", 2)
    before = snapshot(shard)
    assert shard.push(1, 0, [], 0, 2, []) is True
    before["pushes_applied"] += 1                             # counted, nothing else moves
    assert_unchanged(shard, before)


def test_bsp_zero_sample_push_with_a_payload_is_refused_or_ignored():
    shard, _ = make("bsp", 2)
    before = snapshot(shard)
    try:
        shard.push(1, 0, [], 0, 2, received(np.ones(SIZE, np.float32)))
    except ProtocolError as exc:
        assert exc.code == Error.BAD_PAYLOAD
    assert np.array_equal(shard.grad, before["grad"])


def test_bsp_reads_never_count_as_stale():
    shard, _ = make("bsp", 2)
    assert shard.note_read(0) == 0 and shard.max_staleness == 0


# -- SSP ------------------------------------------------------------------------------

def test_ssp_push_applied_on_arrival_as_mean_over_its_own_samples():
    shard, p0 = make("ssp", 2, staleness=1)
    g0, g1 = grad_sums(2)
    assert shard.push(0, 0, [0], 4, 2, received(g0)) is True
    p1 = sgd(p0, g0 / np.float32(4))
    close(shard.params, p1)
    assert shard.version == 1 and shard.clocks == [1, 0]
    assert shard.push(1, 0, [1], 2, 2, received(g1)) is True
    close(shard.params, sgd(p1, g1 / np.float32(2)))
    assert shard.version == 2 and shard.clocks == [1, 1]
    assert shard.pushes_applied == 2


def test_ssp_clock_is_last_pushed_step_plus_one_and_never_goes_back():
    shard, _ = make("ssp", 2, staleness=3)
    g = grad_sums(3)
    shard.push(0, 4, [40], 1, 1, received(g[0]))
    assert shard.clocks == [5, 0]
    shard.push(0, 2, [20], 1, 1, received(g[1]))             # a late push for an older clock
    assert shard.clocks == [5, 0]
    shard.push(1, 0, [0], 1, 1, received(g[2]))
    assert shard.clocks == [5, 1]


@pytest.mark.parametrize("staleness", [0, 1, 2, 5])
def test_ssp_gate_opens_exactly_when_min_clock_reaches_c_minus_s(staleness):
    shard, _ = make("ssp", 3, staleness=staleness)
    rng = np.random.default_rng(staleness)
    clocks = [0, 0, 0]
    tid = 0
    for _ in range(40):
        w = int(rng.integers(3))
        shard.push(w, clocks[w], [tid], 1, 1, received(np.zeros(SIZE, np.float32)))
        tid += 1
        clocks[w] += 1
        assert shard.clocks == clocks
        for c in range(max(clocks) + staleness + 3):
            assert shard.pull_ready(c) == (min(clocks) >= c - staleness), (clocks, c)


def test_ssp_frozen_worker_bounds_how_far_the_others_can_read():
    s, c1 = 2, 3
    shard, _ = make("ssp", 2, staleness=s)
    tick = []                                                 # zero-sample pushes: clocks only
    for step in range(c1):                                    # worker 1 reaches clock c1, freezes
        shard.push(1, step, tick, 0, 1, tick)
    # Worker 0 runs the SSP loop: read at its clock, then push that clock's gradient.
    clock, tid = 0, 0
    while shard.pull_ready(clock):
        assert shard.note_read(clock) <= s
        shard.push(0, clock, [tid], 1, 1, received(np.ones(SIZE, np.float32)))
        clock, tid = clock + 1, tid + 1
    assert clock == c1 + s + 1                                # read up to c1 + s, not c1 + s + 1
    assert shard.pull_ready(c1 + s) and not shard.pull_ready(c1 + s + 1)
    assert shard.max_staleness == s
    shard.push(1, c1, tick, 0, 1, tick)                       # the frozen worker moves on
    assert shard.pull_ready(c1 + s + 1) and not shard.pull_ready(c1 + s + 2)


def test_ssp_zero_sample_clock_tick_moves_the_clock_not_the_parameters():
    shard, _ = make("ssp", 2, staleness=0)
    before = snapshot(shard)
    assert shard.push(1, 0, [], 0, 1, []) is True
    assert shard.clocks == [0, 1]
    assert np.array_equal(shard.params, before["params"])
    assert shard.version == 0


def test_ssp_note_read_records_the_largest_staleness():
    shard, _ = make("ssp", 3, staleness=4)
    for step in range(6):
        shard.push(0, step, [], 0, 1, [])
    shard.push(1, 0, [], 0, 1, [])                            # clocks [6, 1, 0]
    assert shard.note_read(3) == 3
    assert shard.note_read(1) == 1
    assert shard.note_read(0) == 0                            # never negative
    assert shard.max_staleness == 3
    assert shard.stats()["max_staleness"] == 3


def test_ssp_duplicate_task_is_rejected_and_changes_nothing():
    shard, _ = make("ssp", 2, staleness=1)
    g0, g1 = grad_sums(2)
    shard.push(0, 0, [0, 1], 3, 2, received(g0))
    before = snapshot(shard)
    assert before["tasks_applied"] == 2
    assert shard.push(0, 0, [0, 1], 3, 2, received(g0)) is False       # a retry
    assert shard.push(1, 1, [1, 7], 3, 2, received(g1)) is False       # overlaps by one
    assert shard.duplicates_rejected == 2
    assert_unchanged(shard, before)


# -- ASP ------------------------------------------------------------------------------

def test_asp_always_ready_once_initialised():
    shard = Shard(SIZE, SGD, "asp", 0, 2)
    assert not shard.pull_ready(0)
    shard.init(received(np.zeros(SIZE, np.float32)))
    assert all(shard.pull_ready(c) for c in (0, 1, 10, 10**9))


def test_asp_applies_on_arrival_and_rejects_duplicates():
    shard, p0 = make("asp", 2)
    g0, g1 = grad_sums(2)
    shard.push(1, 7, [3], 2, 4, received(g0))
    p1 = sgd(p0, g0 / np.float32(2))
    close(shard.params, p1)
    before = snapshot(shard)
    assert shard.push(0, 0, [3], 5, 4, received(g1)) is False
    assert shard.duplicates_rejected == 1
    assert_unchanged(shard, before)


# -- every mode: initialisation and refused input -------------------------------------

MODES = [("bsp", 0), ("ssp", 1), ("asp", 0)]


@pytest.mark.parametrize("mode,s", MODES)
def test_uninitialised_shard_refuses_pushes_and_pulls(mode, s):
    shard = Shard(SIZE, SGD, mode, s, 2)
    assert not shard.pull_ready(0)
    (g,) = grad_sums(1)
    refuse(Error.NOT_READY, shard.push, 0, 0, [0], 1, 1, received(g))
    assert shard.params is None and not shard.grad.any() and shard.version == 0


@pytest.mark.parametrize("mode,s", MODES)
def test_init_happens_once_and_owns_a_writable_copy(mode, s):
    shard = Shard(SIZE, SGD, mode, s, 2)
    p0 = np.arange(SIZE, dtype=np.float32)
    chunks = received(p0)
    assert shard.init(chunks) is True
    assert np.array_equal(shard.params, p0)
    assert shard.params.flags.writeable
    assert not any(np.shares_memory(shard.params, c) for c in chunks)
    assert shard.init(received(-p0)) is False                 # a retry or another worker
    assert np.array_equal(shard.params, p0)


@pytest.mark.parametrize("mode,s", MODES)
@pytest.mark.parametrize("size", [SIZE - 1, SIZE + 1, 0])
def test_init_of_the_wrong_size_is_refused(mode, s, size):
    shard = Shard(SIZE, SGD, mode, s, 2)
    refuse(Error.BAD_PAYLOAD, shard.init, received(np.zeros(size, np.float32)))
    assert shard.params is None
    assert shard.init(received(np.zeros(SIZE, np.float32))) is True


@pytest.mark.parametrize("mode,s", MODES)
@pytest.mark.parametrize("size", [SIZE - 1, SIZE + 1, 0])
def test_push_of_the_wrong_size_is_refused_and_changes_nothing(mode, s, size):
    shard, _ = make(mode, 2, s)
    if mode == "bsp":                                         # mid-step: a non-empty buffer
        shard.push(0, 0, [0], 1, 2, received(np.ones(SIZE, np.float32)))
    before = snapshot(shard)
    refuse(Error.BAD_PAYLOAD, shard.push, 1, 0, [1], 1, 2, received(np.ones(size, np.float32)))
    assert_unchanged(shard, before)
    assert shard.duplicates_rejected == 0


@pytest.mark.parametrize("mode,s", MODES)
@pytest.mark.parametrize("worker", [-1, 2, 100])
def test_push_from_an_unknown_worker_is_refused(mode, s, worker):
    shard, _ = make(mode, 2, s)
    before = snapshot(shard)
    (g,) = grad_sums(1)
    refuse(Error.UNKNOWN_SENDER, shard.push, worker, 0, [0], 1, 1, received(g))
    assert_unchanged(shard, before)


@pytest.mark.parametrize("mode,s", MODES)
@pytest.mark.parametrize("tasks,samples", [([], 3), ([0], 0), ([0], -1), ([], -1)])
def test_samples_must_be_positive_exactly_when_tasks_are_named(mode, s, tasks, samples):
    shard, _ = make(mode, 2, s)
    before = snapshot(shard)
    (g,) = grad_sums(1)
    refuse(Error.BAD_FIELD, shard.push, 0, 0, tasks, samples, 1, received(g))
    assert_unchanged(shard, before)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError):
        Shard(SIZE, SGD, "sync", 0, 2)


def test_stats_names_the_counters():
    shard, _ = make("ssp", 2, staleness=1)
    assert shard.stats() == {"version": 0, "pushes_applied": 0, "tasks_applied": 0,
                             "duplicates_rejected": 0,
                             "max_staleness": 0, "clocks": [0, 0], "fenced_rejected": 0,
                             "dead": [], "clipped_steps": 0, "step_tasks": [],
                             "state_bytes": {"params": 4 * SIZE, "aggregation": 4 * SIZE,
                                             "scratch": 2 * 4 * SIZE}}


# -- fencing and the previous version (fault tolerance) --------------------------------

def test_fenced_incarnation_is_refused_and_changes_nothing():
    shard, _ = make("ssp", 2, staleness=1)
    shard.fence(1, incarnation=7)
    before = shard.params.copy()
    with pytest.raises(ProtocolError) as err:
        shard.push(1, 0, [0], 1, 1, [np.ones(shard.size, np.float32)], incarnation=7)
    assert err.value.code == Error.FENCED
    assert np.array_equal(shard.params, before) and shard.fenced_rejected == 1
    with pytest.raises(ProtocolError):
        shard.check_live(7)


def test_a_dead_worker_holds_no_ssp_reader_back_until_its_replacement_pushes():
    shard, _ = make("ssp", 2, staleness=1)
    shard.push(0, 0, [], 0, 1, [])
    shard.push(0, 1, [], 0, 1, [])                  # worker 0 at clock 2, worker 1 at 0
    assert not shard.pull_ready(2)
    shard.fence(1, incarnation=7)
    assert shard.pull_ready(2) and shard.min_clock(0) == 2   # only worker 0 counts now
    shard.push(1, 0, [], 0, 1, [], incarnation=8)   # a new incarnation of worker 1 ticks
    assert 1 not in shard.dead and shard.clocks[1] == 1


def test_bsp_serves_the_previous_version_exactly():
    shard, _ = make("bsp", 1)
    v0 = shard.params.copy()
    shard.push(0, 0, [0], 1, 1, [np.ones(shard.size, np.float32)])
    assert shard.version == 1
    buf, version = shard.params_for(0)
    assert version == 0 and np.array_equal(buf, v0)
    buf, version = shard.params_for(1)
    assert version == 1 and buf is shard.params
    shard.push(0, 1, [1], 1, 1, [np.ones(shard.size, np.float32)])
    with pytest.raises(ProtocolError) as err:
        shard.params_for(0)
    assert err.value.code == Error.GONE


# -- the previous version lives in the aggregation buffer ------------------------------

def complete_step(shard: Shard, step: int, seed: int) -> None:
    for w, tasks, n, g in bsp_step(step, seed):
        shard.push(w, step, tasks, n, STEP_TASKS, received(g))


def test_bsp_previous_version_lives_in_the_aggregation_buffer_until_the_next_push():
    shard, _ = make("bsp", 3)
    complete_step(shard, 0, seed=1)
    v1 = shard.params.copy()
    complete_step(shard, 1, seed=2)
    assert shard.version == 2 and shard.grad_is_prev
    assert np.array_equal(shard.grad, v1)                     # exactly version 1, bit for bit
    buf, version = shard.params_for(1)
    assert version == 1 and buf is shard.grad                 # served from there, no copy
    refuse(Error.GONE, shard.params_for, 0)                   # two back: gone, as before

    w, tasks, n, g = bsp_step(2, seed=3)[0]
    shard.push(w, 2, tasks, n, STEP_TASKS, received(g))       # the first push of step 2
    assert not shard.grad_is_prev
    assert np.array_equal(shard.grad, g)                      # copied over version 1
    refuse(Error.GONE, shard.params_for, 1)                   # the worker reports the task done
    buf, version = shard.params_for(2)
    assert version == 2 and buf is shard.params


def test_bsp_late_duplicate_of_the_completed_step_keeps_the_previous_version():
    shard, _ = make("bsp", 3)
    complete_step(shard, 0, seed=1)
    v0 = shard.grad.copy()
    before = snapshot(shard)
    w, tasks, n, g = bsp_step(0, seed=1)[2]
    assert shard.push(w, 0, tasks, n, STEP_TASKS, received(g * 9)) is False
    assert shard.push(w, 0, [77], n, STEP_TASKS, received(g * 9)) is False
    assert_unchanged(shard, before)
    assert np.array_equal(shard.params_for(0)[0], v0)


def test_bsp_refused_or_empty_pushes_of_the_next_step_keep_the_previous_version():
    shard, _ = make("bsp", 3)
    complete_step(shard, 0, seed=1)
    before = snapshot(shard)
    (g,) = grad_sums(1, seed=4)
    refuse(Error.BAD_FIELD, shard.push, 0, 1, [6, 7, 8, 9, 10, 11, 12], 7, STEP_TASKS,
           received(g))                                       # more tasks than the step has
    refuse(Error.BAD_FIELD, shard.push, 0, 2, [12], 1, STEP_TASKS, received(g))
    shard.fence(0, incarnation=5)
    refuse(Error.FENCED, shard.push, 0, 1, [6], 1, STEP_TASKS, received(g), 5)
    assert shard.push(1, 1, [], 0, STEP_TASKS, []) is True    # no gradient: nothing overwritten
    before["pushes_applied"] += 1
    assert_unchanged(shard, before)
    assert shard.params_for(0)[1] == 0


def test_bsp_steps_after_the_buffer_held_the_previous_version_stay_exact():
    # Adam on a shard of several optimizer chunks (the last one short), three steps of
    # three pushes each: the same bits as the optimizer applied to the mean directly.
    size = 2 * CHUNK + 123
    config = {"name": "adam", "lr": 0.01}
    shard = Shard(size, config, "bsp", 0, 3)
    rng = np.random.default_rng(5)
    p = rng.standard_normal(size).astype(np.float32)
    shard.init([p.copy()])
    oracle = make_optimizer(config, size, chunk=size)
    for step in range(3):
        sums = [rng.standard_normal(size).astype(np.float32) for _ in range(3)]
        for w, g in enumerate(sums):
            shard.push(w, step, [3 * step + w], w + 1, 3, [g])
        before = p.copy()
        oracle.step(p, (sums[0] + sums[1] + sums[2]) / 6)
        assert np.array_equal(shard.params, p)
        assert np.array_equal(shard.params_for(step)[0], before)


def test_restore_keeps_no_previous_version():
    shard, _ = make("bsp", 1)
    shard.push(0, 0, [0], 1, 1, received(np.ones(SIZE, np.float32)))
    shard.restore(shard.params.copy(), shard.optimizer.state(), 7)
    assert not shard.grad_is_prev and shard.version == 7
    refuse(Error.GONE, shard.params_for, 6)     # steps before a checkpoint were all applied
    assert shard.params_for(7)[1] == 7


def test_unshare_gives_fresh_copies_of_what_a_pull_may_be_sending():
    shard, _ = make("bsp", 1)
    shard.push(0, 0, [0], 1, 1, received(np.ones(SIZE, np.float32)))
    sending_prev, sending_now = shard.params_for(0)[0], shard.params_for(1)[0]
    prev, now = sending_prev.copy(), sending_now.copy()
    assert shard.unshare() == 2 * 4 * SIZE
    shard.push(0, 1, [1], 1, 1, received(np.full(SIZE, 3, np.float32)))
    assert np.array_equal(sending_prev, prev) and np.array_equal(sending_now, now)
    shard.push(0, 2, [2], 1, 1, received(np.full(SIZE, 3, np.float32)))
    assert shard.unshare() == 2 * 4 * SIZE      # grad holds version 2 again
    shard.push(0, 3, [3], 1, 2, received(np.ones(SIZE, np.float32)))   # step not complete
    assert not shard.grad_is_prev and shard.unshare() == 4 * SIZE


@pytest.mark.parametrize("mode,s", [("ssp", 1), ("asp", 0)])
def test_ssp_and_asp_keep_no_previous_version(mode, s):
    shard, _ = make(mode, 1, staleness=s)
    shard.push(0, 0, [0], 1, 1, received(np.ones(SIZE, np.float32)))
    assert not shard.grad_is_prev and shard.params_for(0)[0] is shard.params


@pytest.mark.parametrize("config,arrays", [
    ({"name": "adam"}, 4), ({"name": "adamw", "amsgrad": True}, 5),
    ({"name": "sgd", "lr": 0.1, "momentum": 0.9}, 3), ({"name": "sgd", "lr": 0.1}, 2)])
@pytest.mark.parametrize("mode", ["bsp", "ssp"])
def test_state_bytes_are_params_optimizer_state_one_aggregation_buffer_and_scratch(
        config, arrays, mode):
    # The bound: parameters + optimizer state + one aggregation buffer, plus a
    # constant per shard (two optimizer scratch chunks); nothing else, in any mode.
    size = 3 * CHUNK + 5
    shard = Shard(size, config, mode, 1, 2)
    shard.init([np.zeros(size, np.float32)])
    shard.push(0, 0, [0], 1, 1 if mode == "bsp" else 2, [np.ones(size, np.float32)])
    held = shard.state_bytes()
    assert held.pop("scratch") == 2 * 4 * CHUNK
    assert held["params"] == held["aggregation"] == 4 * size
    assert sum(held.values()) == arrays * 4 * size
    arrays_held = [a for a in vars(shard).values() if isinstance(a, np.ndarray)]
    arrays_held += [a for a in vars(shard.optimizer).values() if isinstance(a, np.ndarray)]
    arrays_held += list(shard.optimizer._buffers.values())
    assert sum(a.nbytes for a in arrays_held) == sum(shard.state_bytes().values())
