"""Single-process checks of the example jobs in examples/, with no cluster involved.

Each job is loaded the way a worker loads it (by file path), then held to the job
contract: the required names exist, the model is float32 parameters and nothing else,
the data set is identical on every build whatever the global seed, and `loss_fn` gives a
finite scalar on a default-collated batch. A few optimizer steps on one fixed batch must
lower its loss, which shows gradients reach every layer. These are the oracle side of the
cluster tests: if a job fails here, a cluster failure on it says nothing about the cluster.
"""
import importlib.util
import math
import pathlib
import signal

import pytest
import torch
from torch.utils.data import default_collate

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
JOBS = ["linear_regression", "mlp_classifier", "char_transformer"]
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
OVERFIT_STEPS = 30      # steps on one batch; enough for every job's loss to drop clearly
TEST_TIMEOUT_S = 60     # hard limit per test; the whole file takes a few seconds


@pytest.fixture(autouse=True)
def hard_timeout_one_thread():
    """Fail a test that runs past TEST_TIMEOUT_S instead of hanging the suite.

    Also pins torch to one thread, as a worker is: on a 2-core machine the default of two
    intra-op threads made the transformer steps ~8x slower (0.8 s -> 6 s for 30 steps).
    """
    def on_alarm(signum, frame):
        raise TimeoutError(f"test ran past {TEST_TIMEOUT_S} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    signal.alarm(TEST_TIMEOUT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    torch.set_num_threads(threads)


def load_job(name):
    """Import examples/<name>.py by path, as a worker does."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def make_optimizer(job, model):
    """Map the job's OPTIMIZER dict onto the torch.optim class of the same name."""
    args = dict(job.OPTIMIZER)
    return OPTIMIZERS[args.pop("name")](model.parameters(), **args)


def first_batch(job, dataset):
    """The first BATCH_SIZE samples, collated exactly as the framework collates them."""
    return default_collate([dataset[i] for i in range(job.BATCH_SIZE)])


@pytest.mark.parametrize("name", JOBS)
def test_contract(name):
    job = load_job(name)
    assert callable(job.build_model) and callable(job.build_dataset)
    assert callable(job.loss_fn)
    assert job.OPTIMIZER["name"] in OPTIMIZERS
    assert isinstance(job.BATCH_SIZE, int) and job.BATCH_SIZE > 0
    assert isinstance(getattr(job, "EPOCHS", 1), int)
    assert isinstance(getattr(job, "SHUFFLE", True), bool)

    torch.manual_seed(0)
    model = job.build_model()
    assert list(model.buffers()) == []  # servers hold parameters only
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.manual_seed(0)
    twin = job.build_model()  # same seed, same initial parameters
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)

    # Different global seeds on purpose: data must come from the job's own generator.
    torch.manual_seed(1)
    dataset = job.build_dataset()
    torch.manual_seed(2)
    again = job.build_dataset()
    assert len(dataset) == len(again) >= job.BATCH_SIZE
    everything = default_collate([dataset[i] for i in range(len(dataset))])
    for a, b in zip(everything, default_collate([again[i] for i in range(len(again))])):
        assert torch.equal(a, b)

    loss = job.loss_fn(model, first_batch(job, dataset))
    assert loss.dim() == 0 and math.isfinite(loss.item())


@pytest.mark.parametrize("name", JOBS)
def test_loss_falls_and_finish_runs(name, capsys):
    job = load_job(name)
    torch.manual_seed(0)
    model = job.build_model()
    torch.manual_seed(0)
    batch = first_batch(job, job.build_dataset())
    opt = make_optimizer(job, model)
    with torch.no_grad():
        before = job.loss_fn(model, batch).item()
    for _ in range(OVERFIT_STEPS):
        opt.zero_grad()
        job.loss_fn(model, batch).backward()
        opt.step()
    with torch.no_grad():
        after = job.loss_fn(model, batch).item()
    assert after < 0.7 * before, (before, after)
    if hasattr(job, "finish"):
        job.finish(model)
        assert name in capsys.readouterr().out  # finish says which job it reports on


def test_linear_regression_least_squares_is_the_true_answer():
    """Noise-free data: the full-batch least-squares fit is exactly the true parameters."""
    job = load_job("linear_regression")
    x, y = default_collate([s for s in job.build_dataset()])     # (n, 8), (n, 1)
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()  # (n, 9): bias column
    solution = torch.linalg.lstsq(design, y.double()).solution.squeeze(1)  # (9,)
    truth = torch.tensor(job.TRUE_WEIGHT + [job.TRUE_BIAS], dtype=torch.float64)
    assert torch.allclose(solution, truth, atol=1e-5)


def test_linear_regression_plain_training_converges():
    """The single-process oracle: EPOCHS of minibatch SGD reach the true weights."""
    job = load_job("linear_regression")
    torch.manual_seed(0)
    model = job.build_model()
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(job.build_dataset(), batch_size=job.BATCH_SIZE,
                                         shuffle=job.SHUFFLE)
    opt = make_optimizer(job, model)
    for _ in range(job.EPOCHS):
        for batch in loader:
            opt.zero_grad()
            job.loss_fn(model, batch).backward()
            opt.step()
    weight = model.weight.detach().squeeze(0)
    assert torch.allclose(weight, torch.tensor(job.TRUE_WEIGHT), atol=1e-4)
    assert abs(model.bias.item() - job.TRUE_BIAS) < 1e-4
