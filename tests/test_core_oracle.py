"""The core in one file (examples/ps_in_one_file.py) against single-process torch.

1. The toy's BSP loop, for S and M in {1, 2, 3}, one or two tasks per worker, SGD with
   momentum and Adam, pushes shuffled and every third one sent twice, ends with the
   parameters of plain torch.optim on the same global batches (tests/cluster.py's
   oracle), to rtol 1e-5 plus atol 1e-5 max|w| per tensor; and every duplicate was
   refused, as the shards' own counters say.
2. The same loop with the server's real core swapped in: ps.core.shard.Shard, which
   steps with ps.core.optim. Same oracle, same counters. This ties the toy to the code
   it teaches.
3. A toy shard that sums a repeated task again fails that check: the oracle can fail.

In-process and socket-free: the whole file runs in a few seconds.
"""
import importlib.util
import json
import os
import runpy

import pytest
import torch

from cluster import EXAMPLES, JOBS, assert_params_close, oracle
from ps.core.shard import Shard
from worker.job import load_job

STEPS = 20                  # tiny_mlp: 200 samples, batches of 24, so 9 steps an epoch, the
                            # last of 8 samples; 20 steps cross two epoch ends
JOB = os.path.join(JOBS, "tiny_mlp.py")
RTOL = 1e-5                 # tests/test_oracle.py's bar for a cluster
DUPLICATE_EVERY = 3         # every third push of a step is sent twice
OPTIMIZERS = {
    "sgd_momentum": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "adam": {"name": "adam", "lr": 0.01},
}
TOPOLOGIES = [(s, m) for s in (1, 2, 3) for m in (1, 2, 3)]     # (servers, workers)

torch.set_num_threads(1)    # a worker's setting; tiny models gain nothing from a second thread

_spec = importlib.util.spec_from_file_location("ps_in_one_file",
                                               os.path.join(EXAMPLES, "ps_in_one_file.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


class RealShard:
    """The server's core, ``ps.core.shard.Shard`` in BSP mode (its optimizer from
    ``ps.core.optim.make_optimizer``), behind the toy's ``make_shard`` interface."""

    def __init__(self, initial, optimizer):
        self.core = Shard(initial.size, optimizer, "bsp", staleness=0, num_workers=1)
        assert self.core.init([initial])

    def push(self, step, tasks, samples, step_tasks, grad):
        # BSP's rules do not depend on the sender, so every push comes as worker 0's; the
        # gradient arrives as one frame, as a push of this size does on the wire.
        return self.core.push(0, step, tasks, samples, step_tasks, [grad])

    def pull_ready(self, version):
        return self.core.pull_ready(version)

    @property
    def params(self):                   # the live buffer: what answers a read at `version`
        return self.core.params

    @property
    def version(self):
        return self.core.version

    @property
    def duplicates_rejected(self):
        return self.core.duplicates_rejected


class SumsDuplicates(toy.Shard):
    """A mutant: within a step, a push repeating a task is summed again (a retry counted
    twice). Pushes for a completed step are still refused, so nothing else breaks."""

    def is_duplicate(self, step, tasks):
        return step < self.version


@pytest.fixture(scope="module")
def reference():
    """Single-process torch on tiny_mlp, per optimizer, computed once."""
    cache = {}

    def get(opt_name):
        if opt_name not in cache:
            cache[opt_name] = oracle(JOB, STEPS,
                                     env={"TINY_MLP_OPTIMIZER": json.dumps(OPTIMIZERS[opt_name])})
        return cache[opt_name]
    return get


def run(make_shard, opt_name, servers, workers, tasks_per_worker):
    """The toy loop on tiny_mlp's model and data (the oracle's, seed 0)."""
    job = load_job(JOB)
    model, dataset = job.build(seed=0)
    return toy.train(model, dataset, job.loss, OPTIMIZERS[opt_name], job.batch_size,
                     servers, workers, STEPS, tasks_per_worker, shuffle_pushes=True,
                     duplicate_every=DUPLICATE_EVERY, make_shard=make_shard)


@pytest.mark.parametrize("make_shard", [toy.Shard, RealShard], ids=["toy", "real"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("servers,workers", TOPOLOGIES)
@pytest.mark.parametrize("tasks_per_worker", [1, 2])
def test_bsp_loop_equals_single_process_torch(reference, make_shard, opt_name, servers,
                                              workers, tasks_per_worker):
    got, counts = run(make_shard, opt_name, servers, workers, tasks_per_worker)
    # Every duplicate was sent and refused: a shard that stopped refusing them, or a loop
    # that stopped sending them, fails here before the parameters are compared.
    sent = STEPS * -(-servers * workers // DUPLICATE_EVERY)
    assert counts["duplicates_sent"] == sent
    assert counts["duplicates_rejected"] == sent
    assert_params_close(got, reference(opt_name), rtol=RTOL)


def test_a_shard_that_sums_duplicates_fails_the_oracle(reference):
    got, counts = run(SumsDuplicates, "sgd_momentum", 2, 3, 2)
    assert counts["duplicates_rejected"] < counts["duplicates_sent"]   # some summed twice
    with pytest.raises(AssertionError, match="parameter"):
        assert_params_close(got, reference("sgd_momentum"), rtol=RTOL)


def test_the_mutant_passes_without_duplicates(reference):
    """The mutant above fails for its duplicates, not for anything else it changed."""
    job = load_job(JOB)
    model, dataset = job.build(seed=0)
    got, counts = toy.train(model, dataset, job.loss, OPTIMIZERS["sgd_momentum"],
                            job.batch_size, 2, 3, STEPS, 2, shuffle_pushes=True,
                            make_shard=SumsDuplicates)
    assert counts["duplicates_sent"] == counts["duplicates_rejected"] == 0
    assert_params_close(got, reference("sgd_momentum"), rtol=RTOL)


def test_example_runs_and_matches_torch(capsys):
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(EXAMPLES, "ps_in_one_file.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out
    assert out.count("duplicate pushes refused") == len(toy.OPTIMIZERS), out
    assert "matches single-process torch" in out
