"""ps.core.optim against its oracle, torch.optim, plus state round-trips and config checks.

Each oracle test runs the same 100 seeded gradients through torch.optim (single-tensor
path, forced with foreach=False) on a torch tensor and through ps.core.optim on a numpy copy,
then compares the final parameters. Everything is in-process numpy and torch: no sockets,
no child processes, nothing that can hang; the project-wide pytest timeout is the limit.
"""

import numpy as np
import pytest
import torch

from ps.core.optim import CHUNK, make_optimizer

# The oracle's tensors are tiny, yet torch hands some element-wise ops (sqrt) to its
# OpenMP/MKL pool; on a loaded 2-core box that cost ~6 ms per call instead of ~3 us
# (measured), turning this file from ~3 s into ~7 s. Element-wise results do not depend on
# the thread count, so one thread changes nothing but the time.
torch.set_num_threads(1)

SIZE = 4096
STEPS = 100
RTOL = 1e-6
# Why this atol: torch fuses `a + s*b` into one FMA where numpy rounds twice (emulating
# the FMA in float64 makes "sgd plain" bit-identical to torch, so that is the whole gap).
# Each step can thus differ by about one float32 ulp of the values *along the way*, and
# the differences random-walk: ~sqrt(100) ulp after 100 steps. A parameter that ends near
# zero keeps the absolute error it picked up while it was large, so a purely relative
# check fails on it. Hence atol = 1e-6 * max|p| (~8 ulp at the shard's scale); measured
# worst |ps - torch| / max|p| over these cases is 1.8e-7.
ATOL_PER_MAGNITUDE = 1e-6

TORCH_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}

ORACLE_CASES = {
    "sgd plain": {"name": "sgd", "lr": 0.05},
    "sgd momentum": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    "sgd momentum+dampening": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "dampening": 0.3},
    "sgd nesterov": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True},
    "sgd weight_decay": {"name": "sgd", "lr": 0.01, "momentum": 0.5, "weight_decay": 0.1},
    "sgd maximize": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.01,
                     "maximize": True},
    "adam default": {"name": "adam"},
    "adam weight_decay": {"name": "adam", "lr": 0.01, "weight_decay": 0.1},
    "adam amsgrad": {"name": "adam", "lr": 0.01, "amsgrad": True},
    "adam beta1<0.5": {"name": "adam", "lr": 0.01, "betas": (0.3, 0.9)},  # other lerp branch
    "adam maximize": {"name": "adam", "lr": 0.01, "maximize": True, "weight_decay": 0.01},
    "adamw default": {"name": "adamw"},
    "adamw amsgrad": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
}


def _gradients(seed, steps=STEPS, size=SIZE):
    """Seeded read-only float32 gradients whose scale swings, so amsgrad's max matters."""
    rng = np.random.default_rng(seed)
    for t in range(steps):
        g = (rng.standard_normal(size) * (1.0 + 0.8 * np.sin(t / 7.0))).astype(np.float32)
        g.setflags(write=False)                       # as a view of a zmq frame would be
        yield g


def _initial_params(seed):
    return np.random.default_rng(seed).standard_normal(SIZE).astype(np.float32)


def _run_torch(config, params0, grads):
    kwargs = {k: v for k, v in config.items() if k != "name"}
    p = torch.nn.Parameter(torch.from_numpy(params0.copy()))
    opt = TORCH_CLASSES[config["name"]]([p], foreach=False, **kwargs)
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        opt.step()
    return p.detach().numpy()


def _run_ps(config, params, grads, opt=None):
    opt = opt or make_optimizer(config, params.size)
    for g in grads:
        opt.step(params, g)
    return opt


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_matches_torch(case):
    config = ORACLE_CASES[case]
    params0 = _initial_params(seed=1)
    expected = _run_torch(config, params0, _gradients(seed=2))
    params = params0.copy()
    _run_ps(config, params, _gradients(seed=2))

    assert params.dtype == np.float32
    assert not np.array_equal(expected, params0), "oracle did not move: test is vacuous"
    atol = ATOL_PER_MAGNITUDE * float(np.abs(expected).max())
    np.testing.assert_allclose(params, expected, rtol=RTOL, atol=atol)


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_one_step_within_a_few_ulps(case):
    # Sharper than the 100-step check: after one step only the FMA-vs-two-roundings gap
    # (compounded over a handful of operations) may separate us from torch. Bound: a few
    # ulps of the larger of the parameter before and after; measured worst is 4 ulp
    # ("adam beta1<0.5": lerp, square, sqrt and divide each round once more).
    config = ORACLE_CASES[case]
    params0 = _initial_params(seed=7)
    expected = _run_torch(config, params0, _gradients(seed=8, steps=1))
    params = params0.copy()
    _run_ps(config, params, _gradients(seed=8, steps=1))
    ulp = np.spacing(np.maximum(np.abs(params0), np.abs(expected)))
    assert np.all(np.abs(params - expected) <= 8 * ulp)


@pytest.mark.parametrize("case", ["sgd momentum", "sgd nesterov", "adam amsgrad",
                                  "adamw default"])
def test_state_round_trip_continues_identically(case):
    config = ORACLE_CASES[case]
    grads = list(_gradients(seed=3, steps=40))
    params = _initial_params(seed=4)
    first = _run_ps(config, params, grads[:20])
    snapshot = first.state()
    resumed_params = params.copy()

    _run_ps(config, params, grads[20:], opt=first)    # uninterrupted run
    assert snapshot["step"] == 20                     # state() is a copy, not a live view
    resumed = make_optimizer(config, SIZE)
    resumed.load_state(snapshot)
    _run_ps(config, resumed_params, grads[20:], opt=resumed)

    np.testing.assert_array_equal(resumed_params, params)   # bit for bit: same arithmetic
    final, other = first.state(), resumed.state()
    assert final.keys() == other.keys()
    for key in final:
        np.testing.assert_array_equal(final[key], other[key])


def test_beta1_zero_keeps_exactly_the_last_gradient():
    # torch's lerp switches formula for weights >= 0.5 so that weight 1 returns `end`
    # exactly; with beta1 = 0 the first moment must then be the last gradient, bit for bit.
    opt = make_optimizer({"name": "adam", "betas": (0.0, 0.999)}, SIZE)
    params = _initial_params(seed=9)
    for g in _gradients(seed=10, steps=5):
        opt.step(params, g)
    np.testing.assert_array_equal(opt.state()["exp_avg"], g)


def test_state_names():
    assert set(make_optimizer({"name": "sgd", "lr": 0.1}, 8).state()) == {"step"}
    assert set(make_optimizer({"name": "SGD", "lr": 0.1, "momentum": 0.9}, 8).state()) == {
        "step", "momentum_buffer"}
    assert set(make_optimizer({"name": "AdamW", "amsgrad": True}, 8).state()) == {
        "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


def test_load_state_rejects_mismatch():
    opt = make_optimizer({"name": "adam"}, 8)
    state = opt.state()
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state({**state, "exp_avg": np.zeros(9, np.float32)})
    with pytest.raises(ValueError, match="keys"):
        opt.load_state({"step": 0})


@pytest.mark.parametrize("case", ["sgd maximize", "adam maximize", "adamw default"])
def test_read_only_grad_from_a_buffer(case):
    # np.frombuffer over bytes is read-only, like a zero-copy view of a received frame.
    grad_bytes = np.random.default_rng(5).standard_normal(SIZE).astype(np.float32).tobytes()
    grad = np.frombuffer(grad_bytes, dtype=np.float32)
    assert not grad.flags.writeable
    params = _initial_params(seed=6)
    opt = make_optimizer(ORACLE_CASES[case], SIZE)
    opt.step(params, grad)
    opt.step(params, grad)
    assert grad.tobytes() == grad_bytes


def test_rejects_wrong_arrays():
    opt = make_optimizer({"name": "sgd", "lr": 0.1}, 8)
    with pytest.raises(ValueError, match="grad"):
        opt.step(np.zeros(8, np.float32), np.zeros(8, np.float64))
    with pytest.raises(ValueError, match="params"):
        opt.step(np.zeros(7, np.float32), np.zeros(8, np.float32))


@pytest.mark.parametrize("config, match", [
    ({"name": "rmsprop", "lr": 0.1}, "unknown optimizer name"),
    ({"lr": 0.1}, "name"),
    ({"name": "sgd"}, "lr"),
    ({"name": "sgd", "lr": -0.1}, "lr"),
    ({"name": "sgd", "lr": 0.1, "momentun": 0.9}, "momentun"),
    ({"name": "sgd", "lr": 0.1, "momentum": -0.5}, "momentum"),
    ({"name": "sgd", "lr": 0.1, "nesterov": True}, "nesterov"),
    ({"name": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True},
     "nesterov"),
    ({"name": "sgd", "lr": 0.1, "weight_decay": -1}, "weight_decay"),
    ({"name": "sgd", "lr": "0.1"}, "lr"),
    ({"name": "adam", "lr": float("nan")}, "lr"),
    ({"name": "adam", "betas": (1.0, 0.999)}, r"betas\[0\]"),
    ({"name": "adam", "betas": (0.9, -0.1)}, r"betas\[1\]"),
    ({"name": "adam", "betas": 0.9}, "betas"),
    ({"name": "adam", "eps": -1e-8}, "eps"),
    ({"name": "adamw", "amsgrad": "yes"}, "amsgrad"),
    ({"name": "adam", "momentum": 0.9}, "momentum"),
    ({"name": "adam", "decoupled_weight_decay": True}, "decoupled_weight_decay"),
])
def test_bad_config_raises(config, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(config, 16)


# -- chunked passes: the update runs CHUNK elements at a time ----------------------------

CHUNK_CASES = ["sgd momentum", "sgd nesterov", "sgd weight_decay", "sgd maximize",
               "adam default", "adam weight_decay", "adam amsgrad", "adam maximize",
               "adamw default", "adamw amsgrad"]
ODD_SIZE = 1000                  # not a multiple of the chunks below: the last one is short


@pytest.mark.parametrize("case", CHUNK_CASES)
@pytest.mark.parametrize("chunk", [1, 64, 333, 999])
def test_chunks_change_no_bit(case, chunk):
    # Every operation is element-wise, so chunking only reorders which element is done
    # when: the result must equal one whole-shard pass bit for bit, state included.
    config = ORACLE_CASES[case]
    grads = list(_gradients(seed=11, steps=5, size=ODD_SIZE))
    params0 = np.random.default_rng(12).standard_normal(ODD_SIZE).astype(np.float32)
    whole, chunked = params0.copy(), params0.copy()
    a = _run_ps(config, whole, grads, opt=make_optimizer(config, ODD_SIZE, chunk=ODD_SIZE))
    b = _run_ps(config, chunked, grads, opt=make_optimizer(config, ODD_SIZE, chunk=chunk))
    np.testing.assert_array_equal(chunked, whole)
    for key, value in a.state().items():
        np.testing.assert_array_equal(b.state()[key], value)


@pytest.mark.parametrize("case", ["sgd plain", "sgd momentum", "sgd nesterov",
                                  "sgd weight_decay", "adam default", "adamw default"])
def test_chunked_shard_sized_run_matches_torch(case):
    # The oracle check again, on a size that is no multiple of a small chunk.
    config, size = ORACLE_CASES[case], 5 * 97 + 13
    params0 = np.random.default_rng(13).standard_normal(size).astype(np.float32)
    expected = _run_torch(config, params0, _gradients(seed=14, steps=30, size=size))
    params = params0.copy()
    _run_ps(config, params, _gradients(seed=14, steps=30, size=size),
            opt=make_optimizer(config, size, chunk=97))
    atol = ATOL_PER_MAGNITUDE * float(np.abs(expected).max())
    np.testing.assert_allclose(params, expected, rtol=RTOL, atol=atol)


def _sums_and_start(samples: int, seed: int, steps: int):
    """Gradient sums over ``samples`` samples for ``steps`` steps, and starting parameters."""
    sums = [g * np.float32(samples) for g in _gradients(seed=seed, steps=steps, size=ODD_SIZE)]
    return sums, np.random.default_rng(seed + 1).standard_normal(ODD_SIZE).astype(np.float32)


@pytest.mark.parametrize("case", CHUNK_CASES)
def test_divide_by_and_keep_equal_dividing_first_and_copying(case):
    # The BSP shard's call: the gradient buffer holds a sum over 7 samples and receives
    # the old parameters. Same bits as dividing the buffer, copying params, then stepping.
    config, samples = ORACLE_CASES[case], 7
    sums, params0 = _sums_and_start(samples, seed=15, steps=4)
    plain, fused = params0.copy(), params0.copy()
    a = make_optimizer(config, ODD_SIZE)
    b = make_optimizer(config, ODD_SIZE, chunk=128)
    for s in sums:
        before = plain.copy()
        a.step(plain, np.divide(s, samples))
        buffer = s.copy()
        b.step(fused, buffer, divide_by=samples, keep=buffer)
        np.testing.assert_array_equal(fused, plain)
        np.testing.assert_array_equal(buffer, before)     # the previous parameters


def test_scratch_is_a_constant_not_a_multiple_of_the_shard():
    big = make_optimizer({"name": "adam"}, 10 * CHUNK)
    assert big.state_bytes() == {"exp_avg": 40 * CHUNK, "exp_avg_sq": 40 * CHUNK,
                                 "scratch": 2 * 4 * CHUNK}
    small = make_optimizer({"name": "sgd", "lr": 0.1}, 10)
    assert small.state_bytes() == {"scratch": 2 * 4 * 10}   # never more than the shard


def test_keep_must_be_a_writable_shard_sized_array():
    opt = make_optimizer({"name": "sgd", "lr": 0.1}, 8)
    params, grad = np.zeros(8, np.float32), np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="keep"):
        opt.step(params, grad, keep=np.zeros(7, np.float32))
    frozen = np.zeros(8, np.float32)
    frozen.setflags(write=False)
    with pytest.raises(ValueError, match="keep"):
        opt.step(params, grad, keep=frozen)
    with pytest.raises(ValueError, match="chunk"):
        make_optimizer({"name": "sgd", "lr": 0.1}, 8, chunk=0)


@pytest.mark.parametrize("case", CHUNK_CASES)
def test_grad_as_pieces_equals_the_whole_array(case):
    # A shard steps straight from a push's frames: pieces that cut across the chunk grid
    # (7, 128, ...) give the same bits as the whole gradient, and are never written.
    config, samples = ORACLE_CASES[case], 3
    sums, params0 = _sums_and_start(samples, seed=17, steps=3)
    whole, pieced = params0.copy(), params0.copy()
    a = make_optimizer(config, ODD_SIZE, chunk=100)
    b = make_optimizer(config, ODD_SIZE, chunk=100)
    cuts = [7, 135, 400]
    for s in sums:
        before, kept = whole.copy(), np.full(ODD_SIZE, np.nan, np.float32)
        a.step(whole, s.copy(), divide_by=samples)
        pieces = [p.copy() for p in np.split(s, cuts)]
        for p in pieces:
            p.setflags(write=False)
        b.step(pieced, pieces, divide_by=samples, keep=kept)
        np.testing.assert_array_equal(pieced, whole)
        np.testing.assert_array_equal(kept, before)             # the previous parameters
        np.testing.assert_array_equal(np.concatenate(pieces), s)


def test_pieces_must_be_float32_and_add_up_to_the_shard():
    opt = make_optimizer({"name": "sgd", "lr": 0.1}, 8)
    params = np.zeros(8, np.float32)
    for bad in ([np.zeros(3, np.float32), np.zeros(4, np.float32)],      # 7 floats
                [np.zeros(4, np.float32), np.zeros(4, np.float64)],      # a float64 piece
                [np.zeros((2, 4), np.float32)],                          # not 1-D
                (np.zeros(8, np.float32),)):                             # a tuple
        with pytest.raises(ValueError, match="grad"):
            opt.step(params, bad)
    assert not params.any() and opt.state()["step"] == 0
