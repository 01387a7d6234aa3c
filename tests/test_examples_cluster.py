"""Each example runs on a real local cluster (tiny settings) and writes its results."""
import json
import os

import numpy as np
import pytest

from cluster import EXAMPLES, launch
from worker.job import load_job

SUMMARY_FIELDS = {"mode", "staleness", "servers", "workers", "steps", "samples", "final_loss",
                  "wall_s", "samples_per_s", "max_staleness", "per_worker", "duplicates_rejected"}


@pytest.mark.parametrize("example,mode", [("linear_regression", "bsp"),
                                          pytest.param("mlp_classifier", "ssp", marks=pytest.mark.slow),
                                          pytest.param("char_transformer", "asp", marks=pytest.mark.slow)])
def test_example_runs_on_a_cluster(tmp_path, example, mode):
    run = launch(tmp_path, "--job", os.path.join(EXAMPLES, f"{example}.py"), "--mode", mode,
                 "--steps", "4")
    assert run.rc == 0, run.stderr[-3000:]
    summary = run.summary
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["mode"] == mode and summary["steps"] == 4 and summary["workers"] == 2
    assert sum(w["samples"] for w in summary["per_worker"]) == summary["samples"] > 0
    assert np.isfinite(summary["final_loss"])
    with open(tmp_path / "cluster.json") as f:
        roles = json.load(f)["roles"]
    assert set(roles) == {"scheduler", "server0", "server1", "worker0", "worker1"}
    assert all(r["pid"] > 0 for r in roles.values())
    assert roles["server0"]["endpoint"].startswith("tcp://")
    params = run.params
    assert params and all(v.dtype == np.float32 and np.isfinite(v).all() for v in params.values())


@pytest.mark.slow
def test_char_transformer_prints_a_sample(tmp_path):
    run = launch(tmp_path, "--job", os.path.join(EXAMPLES, "char_transformer.py"), "--steps", "2",
                 "--workers", "1", "--servers", "1")
    assert run.rc == 0, run.stderr[-3000:]
    # finish() prints a header, then the prompt and the 200 characters generated after it
    header = "200 characters after 'def ':\n"
    assert header in run.stdout, run.stdout[-3000:]
    printed = run.stdout.split(header, 1)[1]
    sample = printed[len("def "):len("def ") + 200]
    assert printed.startswith("def ") and printed[len("def ") + 200:].startswith("\n"), printed
    vocab = load_job(os.path.join(EXAMPLES, "char_transformer.py")).module.VOCAB
    assert len(sample) == 200 and set(sample) <= set(vocab), sample


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_recommender_beats_the_popularity_baseline(tmp_path):
    # One epoch (a quarter of its run) is enough to beat knowing items alone; its rows are
    # on the servers only, written out as OUT/sparse/<table>.npz.
    run = launch(tmp_path, "--job", os.path.join(EXAMPLES, "recommender.py"), "--epochs", "1",
                 timeout_s=110)
    assert run.rc == 0, run.stderr[-3000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("recommender:"))
    ours, base = (float(w.rstrip(",")) for w in (line.split()[4], line.split()[7]))
    assert ours < 0.97 * base, line
    for table in ("users", "items"):
        out = np.load(tmp_path / "sparse" / f"{table}.npz")
        assert out["rows"].shape == (out["ids"].size, 16) and (np.diff(out["ids"]) > 0).all()
        assert out["ids"].size == run.summary["sparse"][table]["rows"]
        assert out["ids"].min() >= 0 and out["ids"].max() < 10 ** 8
    assert set(run.params) == {"tower.0.weight", "tower.0.bias", "tower.2.weight", "tower.2.bias"}
