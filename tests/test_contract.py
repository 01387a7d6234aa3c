"""The environment contract (``ps.launch.contract``) and ``python -m ps``, which becomes the
role it names: what Slurm, Kubernetes or ps-lite's launchers set, read alike, and a
conflict refused. A cluster started from the environment alone equals the oracle.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cluster import JOBS, ROOT, assert_params_close, oracle
from ps.__main__ import command
from ps.launch.contract import ContractError, resolve

JOB = os.path.join(JOBS, "tiny_mlp.py")


def test_ps_variables_name_the_role():
    role = resolve({"PS_ROLE": "server", "PS_RANK": "2", "PS_SCHEDULER": "10.0.0.1:5555"})
    assert (role.role, role.rank, role.scheduler) == ("server", 2, "tcp://10.0.0.1:5555")
    role = resolve({"PS_ROLE": "scheduler", "PS_SCHEDULER": "tcp://h:7", "PS_SERVERS": "3",
                    "PS_WORKERS": "4"})
    assert (role.servers, role.workers, role.rank) == (3, 4, None)


def test_slurm_tf_config_and_dmlc_are_aliases():
    assert resolve({"PS_ROLE": "worker", "SLURM_PROCID": "5",
                    "PS_SCHEDULER": "tcp://n1:9"}).rank == 5
    tf = {"cluster": {"chief": ["sched:2222"], "ps": ["a:1", "b:1"], "worker": ["c:1"] * 3},
          "task": {"type": "ps", "index": 1}}
    role = resolve({"TF_CONFIG": json.dumps(tf)})
    assert (role.role, role.rank, role.scheduler, role.servers, role.workers) == \
        ("server", 1, "tcp://sched:2222", 2, 3)
    chief = resolve({"TF_CONFIG": json.dumps({**tf, "task": {"type": "chief", "index": 0}})})
    assert (chief.role, chief.rank) == ("scheduler", None)
    role = resolve({"DMLC_ROLE": "scheduler", "DMLC_PS_ROOT_URI": "10.1.1.1",
                    "DMLC_PS_ROOT_PORT": "9091", "DMLC_NUM_SERVER": "2", "DMLC_NUM_WORKER": "8"})
    assert (role.role, role.scheduler, role.servers, role.workers) == \
        ("scheduler", "tcp://10.1.1.1:9091", 2, 8)
    # two sources saying the same thing are fine
    assert resolve({"PS_ROLE": "worker", "DMLC_ROLE": "worker", "PS_RANK": "1",
                    "SLURM_PROCID": "1", "PS_SCHEDULER": "h:1"}).rank == 1


@pytest.mark.parametrize("env,words", [
    ({"PS_ROLE": "server", "DMLC_ROLE": "worker", "PS_SCHEDULER": "h:1"},
     "conflicting role: PS_ROLE says server, DMLC_ROLE says worker"),
    ({"PS_ROLE": "worker", "PS_RANK": "1", "SLURM_PROCID": "3", "PS_SCHEDULER": "h:1"},
     "conflicting rank: PS_RANK says 1, SLURM_PROCID says 3"),
    ({"PS_ROLE": "worker", "PS_SCHEDULER": "a:1", "DMLC_PS_ROOT_URI": "b", "DMLC_PS_ROOT_PORT": "1"},
     "conflicting scheduler"),
    ({"PS_SCHEDULER": "h:1"}, "no role"),
    ({"PS_ROLE": "client", "PS_SCHEDULER": "h:1"}, "not one of"),
    ({"PS_ROLE": "worker"}, "no scheduler address"),
    ({"PS_ROLE": "worker", "PS_SCHEDULER": "nohostport"}, "HOST:PORT"),
    ({"PS_ROLE": "worker", "PS_RANK": "-1", "PS_SCHEDULER": "h:1"}, "must be >= 0"),
    ({"PS_ROLE": "scheduler", "PS_SCHEDULER": "h:1", "PS_SERVERS": "2"}, "needs the counts"),
    ({"TF_CONFIG": "{not json"}, "TF_CONFIG"),
])
def test_a_conflicting_or_incomplete_environment_is_refused_saying_which(env, words):
    with pytest.raises(ContractError, match=words):
        resolve(env)


def test_each_role_becomes_its_own_command():
    sched = resolve({"PS_ROLE": "scheduler", "PS_SCHEDULER": "tcp://127.0.0.1:5000",
                     "PS_SERVERS": "2", "PS_WORKERS": "3"})
    assert command(sched, {}, ["--out", "o"]) == [
        "-m", "ps.scheduler", "--servers", "2", "--workers", "3", "--bind",
        "tcp://127.0.0.1:5000", "--out", "o"]
    server = resolve({"PS_ROLE": "server", "PS_RANK": "1", "PS_SCHEDULER": "sched.svc:5000"})
    argv = command(server, {"PS_ADVERTISE": "server-1.ps"}, [])
    assert argv == ["-m", "ps.server", "--scheduler", "tcp://sched.svc:5000", "--shard", "1",
                    "--bind", "tcp://*:5600", "--advertise", "tcp://server-1.ps:5600"]
    worker = resolve({"PS_ROLE": "worker", "PS_SCHEDULER": "tcp://127.0.0.1:5000"})
    assert command(worker, {"PS_JOB": "j.py"}, ["--out", "o"]) == [
        "-m", "worker", "--scheduler", "tcp://127.0.0.1:5000", "--job", "j.py", "--out", "o"]


def test_python_m_ps_refuses_a_conflict_with_status_2():
    env = {**os.environ, "PS_ROLE": "server", "DMLC_ROLE": "worker", "PS_SCHEDULER": "h:1"}
    done = subprocess.run([sys.executable, "-m", "ps"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "conflicting role" in done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_a_cluster_started_from_the_environment_alone_equals_the_oracle(tmp_path):
    # What an sbatch script or a pod spec does: the same `python -m ps` everywhere, each
    # process told its role by its environment (here a mix of the aliases).
    address = f"127.0.0.1:{free_port()}"
    base = {**os.environ, "PS_SCHEDULER": address}
    out = ["--out", str(tmp_path), "--timeout-s", "30"]
    roles = [({"PS_ROLE": "scheduler", "PS_SERVERS": "2", "PS_WORKERS": "2"}, [*out, "--steps", "12"]),
             ({"DMLC_ROLE": "server", "PS_RANK": "0"}, ["--timeout-s", "30"]),
             ({"PS_ROLE": "server", "SLURM_PROCID": "1"}, ["--timeout-s", "30"]),
             ({"PS_ROLE": "worker", "PS_RANK": "0", "PS_JOB": JOB}, [*out, "--device", "cpu"]),
             ({"PS_ROLE": "worker", "PS_RANK": "1", "PS_JOB": JOB}, [*out, "--device", "cpu"])]
    procs = [subprocess.Popen([sys.executable, "-m", "ps", *args], cwd=ROOT, env={**base, **env},
                              start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for env, args in roles]
    try:
        deadline = time.monotonic() + 90
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        errs = [p.stderr.read() for p in procs]
        assert [p.returncode for p in procs] == [0] * 5, "\n".join(e[-1500:] for e in errs)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    saved = np.load(tmp_path / "params.npz")
    assert_params_close({k: saved[k] for k in saved.files}, oracle(JOB, 12), rtol=1e-5)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["servers"] == 2 and summary["workers"] == 2


SRUN = """#!/usr/bin/env python3
# A stand-in for Slurm's srun on one machine: --ntasks=N copies of the command, each with
# its SLURM_PROCID, all waited for (the other options are Slurm's business).
import os, subprocess, sys
args = sys.argv[1:]
n, i = 1, 0
while i < len(args) and args[i].startswith("--"):
    if args[i].startswith("--ntasks="):
        n = int(args[i].split("=", 1)[1])
    i += 1
procs = [subprocess.Popen(args[i:], env={**os.environ, "SLURM_PROCID": str(k)}) for k in range(n)]
sys.exit(max(p.wait() for p in procs))
"""
SCONTROL = "#!/bin/sh\necho localhost\n"


@pytest.mark.timeout(120)
def test_the_sbatch_script_runs_a_cluster_under_a_stand_in_srun(tmp_path):
    # scripts/slurm/ps.sbatch as sbatch would run it, with srun and scontrol standing in
    # for Slurm's on this machine (every node is localhost, so the roles bind loopback).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": ROOT,
           "SLURM_JOB_ID": str(40000 + free_port() % 1000), "SLURM_JOB_NODELIST": "localhost",
           "SLURM_CPUS_PER_TASK": "1", "SLURM_SUBMIT_DIR": str(tmp_path)}
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm", "ps.sbatch"), JOB,
                           "2", "2", "--steps", "12", "--timeout-s", "30"],
                          env=env, capture_output=True, text=True, timeout=110,
                          start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "runs" / f"slurm-{env['SLURM_JOB_ID']}"
    saved = np.load(out / "params.npz")
    assert_params_close({k: saved[k] for k in saved.files}, oracle(JOB, 12), rtol=1e-5)
