"""The cluster on Ray (--ray): roles placed by resources on the nodes of a simulated
multi-node Ray cluster, with ZeroMQ between them as always.

The Ray cluster (``scripts/ray_sim.py``: a head and one raylet per node, each node
with a custom resource of its own name) and every launcher run inside a loopback-only
network namespace this module makes, so Ray, which binds the machine's first address,
binds 127.0.0.1 there and nothing else. Servers go to the ``srv`` nodes and workers to
the ``wk`` nodes (``--ray-resources``), so every gradient crosses nodes. The promises:
BSP equals the single-process oracle; a node removed mid-run with a worker on it
changes nothing but the time (the scheduler deals the lost tasks again, or the
launcher's replacement does them); SSP and ASP run to the end, applying every sample
once. Skipped, with the reason, without Ray or network namespaces.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from cluster import JOBS, ROOT, Run, check_tiny_mlp_run, finish, oracle

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import ray_sim  # noqa: E402

pytestmark = pytest.mark.slow
JOB = os.path.join(JOBS, "tiny_mlp.py")
STEPS = 60


def launch(sim: ray_sim.Simulated, out, *args, env=None) -> subprocess.Popen:
    """A launcher run on the simulated cluster, servers and workers on their nodes."""
    cmd = sim.command(sys.executable, "-m", "ps.launch", "--quiet", "--out", str(out),
                      "--timeout-s", "30", "--device", "cpu", "--ray", sim.address,
                      *ray_sim.ON_NODES, *args)
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def run_on(sim: ray_sim.Simulated, out, *args, env=None) -> Run:
    return finish(launch(sim, out, *args, env=env), out, 120)


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        sim = ray_sim.Simulated()
    except ray_sim.Unavailable as exc:
        pytest.skip(str(exc))
    try:
        yield sim
    finally:
        sim.close()


@pytest.fixture(scope="module")
def reference():
    return oracle(JOB, STEPS)


def roles(out) -> dict:
    with open(os.path.join(out, "cluster.json")) as f:
        return json.load(f)["roles"]


def wait_for_step(ray_cluster, out, proc, step: int, timeout_s: float = 60) -> None:
    """Until the run has reached ``step`` (the scheduler's STATUS, asked from inside
    the namespace by the cluster's holder)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"the run did not reach step {step}"
        if os.path.exists(os.path.join(out, "cluster.json")):
            if ray_cluster.status(roles(out)["scheduler"]["endpoint"]).get("step", 0) >= step:
                return
        time.sleep(0.05)


def test_bsp_across_nodes_equals_the_oracle(ray_cluster, reference, tmp_path):
    run = run_on(ray_cluster, tmp_path, "--job", JOB, "--steps", str(STEPS), "--workers", "2",
                 "--servers", "2", "--trace")
    check_tiny_mlp_run(run, reference, STEPS)
    where = {name: ray_cluster.names[r["node"]] for name, r in roles(tmp_path).items()}
    assert where["scheduler"] == "head"                      # on the launcher's node
    assert sorted([where["server0"], where["server1"]]) == ["s0", "s1"]   # SPREAD
    assert {where["worker0"], where["worker1"]} <= {"w0", "w1", "w2"}
    assert where["worker0"] != where["worker1"]
    assert all(r["address"] == "127.0.0.1" and r["endpoint"] in (None, "") or
               r["endpoint"].startswith("tcp://127.0.0.1:") for r in roles(tmp_path).values())
    # the workers wrote params.npz and their traces on their nodes: copied back here
    assert sorted(f.split("-")[0] for f in os.listdir(tmp_path / "trace")) == [
        "scheduler.json", "worker0", "worker1"]
    trace = json.load(open(tmp_path / "trace.json"))
    assert len({e["pid"] for e in trace["traceEvents"] if e.get("ph") == "X"}) == 2   # both workers'
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]   # endpoint files taken


def test_a_node_removed_with_a_worker_on_it_changes_nothing(ray_cluster, reference, tmp_path):
    proc = launch(ray_cluster, tmp_path, "--job", JOB, "--steps", str(STEPS), "--workers", "2",
                              "--servers", "2", "--respawn", "--dead-after-s", "1.5",
                              env={"TINY_MLP_DELAY_S": "0.05"})
    wait_for_step(ray_cluster, tmp_path, proc, 10)
    lost = ray_cluster.names[roles(tmp_path)["worker1"]["node"]]
    ray_cluster.remove(lost)
    run = finish(proc, tmp_path, 120)
    summary = check_tiny_mlp_run(run, reference, STEPS, deaths=1)
    assert summary["deaths"][0]["worker"] == 1
    assert "worker1 exited with status -9; starting a replacement" in run.stderr
    placed = ray_cluster.names[roles(tmp_path)["worker1"]["node"]]
    assert placed not in (lost, "head") and placed.startswith("w")   # on a node still there
    assert summary["rejoins"] and summary["rejoins"][0]["worker"] == 1


def test_a_node_removed_with_a_server_on_it_is_recovered_from_a_checkpoint(ray_cluster, reference,
                                                                          tmp_path):
    # --checkpoint-dir (here: under --out) is checked to be seen by every server's node
    proc = launch(ray_cluster, tmp_path, "--job", JOB, "--steps", str(STEPS), "--workers", "2",
                              "--servers", "2", "--checkpoint-every", "5", "--recover",
                              "--dead-after-s", "1.5", env={"TINY_MLP_DELAY_S": "0.05"})
    wait_for_step(ray_cluster, tmp_path, proc, 15)
    lost = ray_cluster.names[roles(tmp_path)["server1"]["node"]]
    ray_cluster.remove(lost)
    run = finish(proc, tmp_path, 120)
    summary = check_tiny_mlp_run(run, reference, STEPS)
    (recovery,) = summary["recoveries"]
    assert recovery["lost"] == "server1" and recovery["resumed_from_step"] >= 10
    now = {ray_cluster.names[roles(tmp_path)[f"server{k}"]["node"]] for k in (0, 1)}
    assert lost not in now


def test_a_killed_scheduler_restarts_from_its_journal(ray_cluster, reference, tmp_path):
    run = run_on(ray_cluster, tmp_path, "--job", JOB, "--steps", str(STEPS), "--workers", "2",
                 "--servers", "2", "--inject", "kill:scheduler@step=20",
                 env={"TINY_MLP_DELAY_S": "0.02"})
    summary = check_tiny_mlp_run(run, reference, STEPS)
    (restart,) = summary["scheduler_restarts"]
    assert restart["members_back"] == 4
    assert "starting it again on tcp://127.0.0.1:" in run.stderr
    assert ray_cluster.names[roles(tmp_path)["scheduler"]["node"]] == "head"   # where its journal is


@pytest.mark.parametrize("mode", ["ssp", "asp"])
def test_ssp_and_asp_run_to_the_end(ray_cluster, tmp_path, mode):
    run = run_on(ray_cluster, tmp_path, "--job", JOB, "--steps", "40", "--workers", "2",
                 "--servers", "2", "--mode", mode)
    assert run.rc == 0, run.stderr[-3000:]
    summary = run.summary
    assert summary["ok"] and summary["mode"] == mode
    applied = [e["samples_applied"] for e in summary["per_epoch"]]
    assert applied == [200] * 4 + [4 * 24], applied        # 40 steps of 24: 4 epochs and 4 steps
    params = run.params
    assert all(np.isfinite(v).all() for v in params.values())
