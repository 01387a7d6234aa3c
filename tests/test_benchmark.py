"""The benchmark script runs end to end (with --tiny) and writes the rows it promises.

Nothing here is about speed: a loaded CI machine may be slow. What is checked is that
each suite starts its processes, measures, stops them all, prints a table and writes
JSON with one row per (size, server count), per mode, per stragglers cell, per model
or per (size, servers, workers), every number positive and finite.
"""
import importlib.util
import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.bench   # smoke tests of the benchmark script: scripts/run_tests.sh --bench

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "benchmark.py"
SUITE_TIMEOUT_S = 30      # each --tiny suite takes a few seconds on 2 cores
STRAGGLERS_TIMEOUT_S = 150   # stragglers --tiny: 10 launcher runs, ~20 s on 2 quiet cores
TRAIN_TIMEOUT_S = 150     # train --tiny: 7 runs of 2-3 torch processes, ~40 s on 2 quiet cores
SCALE_TIMEOUT_S = 120     # scale --tiny: 3 launcher runs and an idle server, ~15 s


def run_suite(out: pathlib.Path, *args: str,
              timeout_s: float = SUITE_TIMEOUT_S) -> tuple[dict, str]:
    """Run one suite in its own process group; whatever happens, kill the group after."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args, "--tiny", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{args[0] if args else 'defaults'} --tiny did not finish in {timeout_s:.0f} s") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(out.read_text()), stdout


def test_defaults_tiny_is_the_suite_run_when_none_is_named(tmp_path):
    result, stdout = run_suite(tmp_path / "defaults.json", timeout_s=TRAIN_TIMEOUT_S)
    assert result["suite"] == "defaults"
    assert [r["pair"] for r in result["rows"]] == ["ddp", "steal"]
    for row in result["rows"]:
        assert row["a_samples_per_s"] > 0 and row["b_samples_per_s"] > 0
        assert row["ratio"] == row["a_samples_per_s"] / row["b_samples_per_s"]
        assert len(row["a_runs"]) == len(row["b_runs"]) == 1
    ours = result["rows"][0]["a_runs"][0]
    assert ours["task_grain"]["adaptive"] is True          # the default flags, really
    assert "| default flags |" in stdout and ">= 1.5x" in stdout


def test_transport_tiny(tmp_path):
    result, stdout = run_suite(tmp_path / "transport.json", "transport", "--servers", "1,2")
    assert result["suite"] == "transport"
    assert [(r["params"], r["servers"]) for r in result["rows"]] == [(100_000, 1), (100_000, 2)]
    for row in result["rows"]:
        assert row["bytes_per_round"] == 2 * 4 * row["params"]
        for key in ("ps_round_trips_per_s", "ps_gb_per_s", "raw_round_trips_per_s",
                    "raw_gb_per_s", "work_round_trips_per_s", "work_gb_per_s", "ps_over_raw",
                    "work_over_raw", "ps_over_work"):
            assert row[key] > 0, key
        assert all(len(row[f"{name}_block_s"]) == 1 for name in ("raw", "work", "ps"))
    assert "| params | servers |" in stdout and "| 100K | 2 |" in stdout


def test_modes_tiny(tmp_path):
    result, stdout = run_suite(tmp_path / "modes.json", "modes")
    assert result["suite"] == "modes"
    assert [r["mode"] for r in result["rows"]] == ["bsp", "ssp", "asp"]
    for row in result["rows"]:
        assert row["steps"] == 3 and row["samples"] > 0
        assert row["samples_per_s"] > 0 and row["wall_s"] > 0
        assert row["final_loss"] is not None and row["final_loss"] > 0
    assert {r["mode"]: r["staleness"] for r in result["rows"]}["ssp"] == 2
    assert "| bsp |" in stdout and "| asp |" in stdout


def load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job_batch_size(path: pathlib.Path) -> int:
    return load(path).BATCH_SIZE


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_stragglers_tiny(tmp_path):
    batch = job_batch_size(ROOT / "scripts" / "jobs" / "compute_bound.py")
    result, stdout = run_suite(tmp_path / "stragglers.json", "stragglers",
                               timeout_s=STRAGGLERS_TIMEOUT_S)
    assert result["suite"] == "stragglers"
    rows = result["rows"]
    assert [(r["section"], r.get("workers"), r.get("mode")) for r in rows] == [
        ("no_slow_worker", 2, None), ("slow_worker", 2, None),
        ("jitter", 2, "bsp"), ("jitter", 2, "ssp"), ("jitter", 2, "asp")]
    for row in rows[:2]:
        for key in ("steal_samples_per_s", "static_samples_per_s"):
            assert row[key] > 0, key
        for run in row["steal_runs"] + row["static_runs"]:
            assert run["samples"] == 2 * batch and run["wall_s"] > 0     # --tiny: 2 steps
            # the grain adapts: a step is one task per worker while their speeds agree,
            # 4 per worker once they differ (the first step is always coarse)
            assert 2 * 2 <= sum(w["tasks"] for w in run["per_worker"]) <= 2 + 8
    fair, slow = rows[0], rows[1]
    assert fair["s_per_sample"] > 0
    assert all(r["stolen_by"] == 0 for run in fair["static_runs"] for r in run["per_worker"])
    for key in ("steal_over_static", "steal_wall_s", "ideal_s", "wall_over_ideal",
                "in_run_ideal_s", "slow_worker_task_share"):
        assert slow[key] > 0, key
    for row in rows[2:]:
        # --tiny aims at a loss above the first step's, so every step reaches it. BSP steps
        # end in order, so step 0 is the first; in SSP and ASP a fast worker's push of
        # step 1 may end before a slow one's of step 0, and the earlier in time counts.
        allowed = [[0]] if row["mode"] == "bsp" else [[0], [1]]
        for side in ("steal", "static"):
            assert row[f"{side}_s_to_target"] > 0
            assert row[f"{side}_step_at_target"] in allowed
            assert row[f"{side}_samples_per_s"] > 0 and row[f"{side}_final_loss"] > 0
            assert not row[f"{side}_estimated"]                # the trace gave every step a time
        assert row["static_over_steal"] > 0
    for title in ("**(a)", "**(b)", "**(c)"):
        assert title in stdout
    assert "| 2 |" in stdout and "| ssp(2) |" in stdout and "| asp |" in stdout


def test_train_tiny(tmp_path):
    result, stdout = run_suite(tmp_path / "train.json", "train", timeout_s=TRAIN_TIMEOUT_S)
    assert result["suite"] == "train"
    [row] = result["rows"]                     # --tiny: the language model only
    assert row["model"] == "char_transformer" and row["optimizer"] == "adamw"
    assert row["batch"] == load(ROOT / "examples" / "char_transformer.py").BATCH_SIZE
    for system in ("ours", "ours_fuse1", "ours_1srv", "ours_bf16", "ddp", "rpc", "rpc_tutorial"):
        assert positive(row[f"{system}_samples_per_s"]) and positive(row[f"{system}_step_s"])
        [run] = row[f"{system}_runs"]
        assert run["batch"] == row["batch"]    # the same global batch everywhere
        assert math.isclose(run["samples_per_s"] * run["step_s"], row["batch"])
    for base in ("ddp", "rpc", "rpc_tutorial"):
        assert row[f"{base}_runs"][0]["params"] == row["params"]
        for system in ("ours", "ours_fuse1", "ours_1srv", "ours_bf16"):
            assert positive(row[f"{system}_over_{base}"])
    # The tutorial's design: each of the 2 trainers updates on its half of the batch.
    assert row["rpc_tutorial_runs"][0]["trainers"] == 2
    assert row["rpc_tutorial_runs"][0]["optimizer"] == row["optimizer"]
    # The variants: one pass per task; bfloat16 gradients and parameters.
    assert row["ours_fuse1_runs"][0]["fuse"] == 1 and row["ours_runs"][0]["fuse"] == 0
    assert row["ours_fuse1_tasks_per_step"] == row["tasks_per_step"]
    assert row["ours_1srv_runs"][0]["servers"] == 1 and row["ours_runs"][0]["servers"] == 2
    assert row["ours_bf16_tasks_per_step"] == row["tasks_per_step"]
    assert row["ours_bf16_grad_dtype"] == row["ours_bf16_param_dtype"] == "bfloat16"
    assert row["ours_fuse1_grad_dtype"] == row["ours_runs"][0]["grad_dtype"] == "float32"
    assert math.isfinite(row["ours_bf16_runs"][0]["final_loss"])
    assert "| char_transformer | 116,318 |" in stdout
    assert "| RPC tutorial samples/s (step ms) |" in stdout and "| ours / RPC tutorial |" in stdout
    assert "| char_transformer: ours, one pass per task | 116,318 |" in stdout
    assert "| char_transformer: ours, 1 server | 116,318 |" in stdout
    assert "| char_transformer: ours, bfloat16 wire | 116,318 |" in stdout


def test_scale_tiny(tmp_path):
    result, stdout = run_suite(tmp_path / "scale.json", "scale", timeout_s=SCALE_TIMEOUT_S)
    assert result["suite"] == "scale"
    rows = result["rows"]
    assert {(r["nominal_params"], r["servers"], r["workers"]) for r in rows} == {
        (100_000, 2, 2), (100_000, 1, 2), (100_000, 2, 1)}
    for row in rows:
        assert positive(row["step_s"]) and positive(row["samples_per_s"])
        assert len(row["per_server"]) == row["servers"]
        assert sum(s["shard_params"] for s in row["per_server"]) == row["params"]
        for server in row["per_server"]:
            # Read while the server ran. At --tiny a shard's 200 KB is within the noise of
            # the heap, so the per-byte figure need only be a number, not a sane one.
            assert server["hwm_bytes"] >= server["rss_bytes"] > 0
            assert math.isfinite(server["rss_per_param_byte"])
        assert positive(row["idle_server_rss_bytes"])
        # What a Shard allocates covers at least its parameters and the aggregation buffer.
        assert row["expected_per_param_byte"] >= row["target_per_param_byte"] >= 2
    assert "**(a) model size" in stdout and "**(c) workers" in stdout


def test_clip_tiny(tmp_path):
    result, stdout = run_suite(tmp_path / "clip.json", "clip", timeout_s=SCALE_TIMEOUT_S)
    assert result["suite"] == "clip"
    rows = result["rows"]
    assert [(r["params"], r["servers"]) for r in rows] == [(100_000, 2), (100_000, 4)]
    for row in rows:
        assert positive(row["plain_step_s"]) and positive(row["clip_step_s"])
        assert row["added_s"] == row["clip_step_s"] - row["plain_step_s"]
        assert row["held_s"] > 0                              # the shards did hold their steps
        assert all(run["held_s"] is None for run in row["plain_runs"])    # and only with clipping
    assert "held for the norm, ms" in stdout


def test_diloco_tiny(tmp_path):
    result, stdout = run_suite(tmp_path / "diloco.json", "diloco", timeout_s=SCALE_TIMEOUT_S)
    rows = result["rows"]
    moved = {(r["mode"], r["inner_steps"]): r["bytes_per_sample"] for r in rows
             if r["part"] == "bytes"}
    assert set(moved) == {("bsp", 1), ("diloco", 8), ("diloco", 32)}
    assert moved[("bsp", 1)] / moved[("diloco", 8)] >= 8 / 1.2    # counted, not assumed
    links = [r for r in rows if r["part"] == "links"]
    assert [(r["mbps"], r["mode"]) for r in links] == [(None, "bsp"), (None, "diloco"),
                                                      (None, "diloco-async")]
    assert all(math.isfinite(r["validation_loss"]) and r["wall_s"] > 0 for r in links)
    assert "**links**" in stdout and "fewer than BSP" in stdout
    slow = [r for r in rows if r["part"] == "straggler"]
    assert [r["mode"] for r in slow] == ["bsp", "diloco", "diloco-async"]
    assert all(len(r["inner_steps_per_round"]) == 2 for r in slow)


def test_cost_tiny(tmp_path):
    result, stdout = run_suite(tmp_path / "cost.json", "cost", timeout_s=SCALE_TIMEOUT_S)
    rows = result["rows"]
    (model,) = [r for r in rows if r["part"] == "model"]
    assert all(model[k] >= 0 for k in ("a_s_per_param", "inv_loop", "link_efficiency_g", "t0_s"))
    measured = [r for r in rows if r["part"] in ("fit", "check")]
    assert {r["mode"] for r in measured} == {"bsp", "diloco", "ring"}
    assert all(r["step_s"] > 0 and r["model_s"] > 0 for r in measured)
    predictions = [r for r in rows if r["part"] == "prediction"]
    assert len(predictions) == 4 and all(
        p["diloco32_s"] <= p["diloco8_s"] <= p["bsp_s"] for p in predictions)   # comm / H
    assert "**predicted**" in stdout and "fastest" in stdout


def test_sparse_tiny(tmp_path):
    result, stdout = run_suite(tmp_path / "sparse.json", "sparse", timeout_s=SCALE_TIMEOUT_S)
    rows = result["rows"]
    tp = [r for r in rows if r["part"] == "throughput"]
    assert [r["dense"] for r in tp] == [False, True]
    assert tp[0]["bytes_per_step"] < tp[1]["bytes_per_step"]      # rows of a batch, not a table
    assert tp[0]["rows_pulled_per_s"] > 0 and tp[1]["rows_pulled_per_s"] is None
    scale = [r for r in rows if r["part"] == "scale"]
    assert len(scale) == 2 and all(r["rows"] > 0 for r in scale)
    assert all(s["index_per_row"] <= 24 for r in scale for s in r["servers"])
    assert "**scale**" in stdout and "worker peak RSS" in stdout


def test_cost_model_fit_recovers_known_coefficients():
    """The fit, on rows made from known coefficients (``a`` is timed, not fitted), gives
    them back."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import cost
    truth = {"a": 3e-9, "inv_loop": 1 / 3e9, "g": 1.1, "t0": 0.005}
    rows = []
    for s, m in cost.UNSHAPED + cost.SHAPED:
        for mbps in (None, 1000.0, 100.0):
            row = {"servers": s, "workers": m, "mbps": mbps, "one_way_s": 0.0, "compute_s": 0.01}
            f = cost.features(row, 1_000_000)
            row["step_s"] = 0.01 + (truth["a"] * 1_000_000 / s + truth["inv_loop"] * f[0]
                                    + truth["g"] * f[1] + truth["t0"] * f[2])
            rows.append(row)
    fitted = cost.fit(rows, 1_000_000, truth["a"])
    assert fitted["inv_loop"] == pytest.approx(truth["inv_loop"], rel=1e-6)
    assert fitted["link_efficiency_g"] == pytest.approx(truth["g"], rel=1e-6)
    assert fitted["t0_s"] == pytest.approx(truth["t0"], rel=1e-6)


def test_mlp10m_job_has_10m_parameters():
    """The train suite's MLP: a valid job (the worker's own loader), ~10M parameters, and
    the width formula the scale suite resizes it with counts what torch builds."""
    sys.path.insert(0, str(ROOT))
    from worker.job import load_job
    job = load_job(str(ROOT / "scripts" / "jobs" / "mlp10m.py"))
    module = job.module
    assert abs(module.param_count(module.HIDDEN) - 10_000_000) < 10_000
    module.HIDDEN = module.hidden_for(50_000)
    model, dataset = job.build(seed=0)
    assert sum(p.numel() for p in model.parameters()) == module.param_count(module.HIDDEN)
    assert abs(module.param_count(module.HIDDEN) - 50_000) < 1_000
    x, y = dataset[0]
    assert x.shape == (module.INPUT_DIM,) and 0 <= int(y) < module.NUM_CLASSES
