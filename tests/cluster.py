"""Test helpers: run a local cluster (or a single-process oracle) and read its results.

Every cluster runs in its own process group with a hard deadline; whatever happens,
the group is killed before the helper returns, so no test leaves a process behind.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.path.join(ROOT, "tests", "jobs")
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, ROOT)

from worker import reference  # noqa: E402


@dataclass
class Run:
    rc: int
    out: str
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict:
        with open(os.path.join(self.out, "summary.json")) as f:
            return json.load(f)

    @property
    def params(self) -> dict[str, np.ndarray]:
        with np.load(os.path.join(self.out, "params.npz")) as npz:
            return {k: npz[k] for k in npz.files}


def launch(out: str, *args: str, env: dict | None = None, timeout_s: float = 90.0) -> Run:
    """Run scripts/start_cluster.sh's launcher to completion (or kill it at the deadline).
    Workers run on the CPU unless ``args`` name a --device: the 1e-5 oracle tests hold on
    the CPU, and a GPU machine must not silently run them on CUDA (tests/test_gpu.py does)."""
    cmd = [sys.executable, "-m", "ps.launch", "--quiet", "--out", str(out),
           "--timeout-s", "30", *cpu_unless_told(args), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return finish(proc, out, timeout_s)


def finish(proc: subprocess.Popen, out: str, timeout_s: float) -> Run:
    """Wait for a launcher started in its own process group, then kill the group."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"cluster did not finish in {timeout_s} s\n{stderr[-3000:]}")
    finally:
        kill_group(proc)
    return Run(proc.returncode, str(out), stdout, stderr)


def cpu_unless_told(args) -> list[str]:
    """``--device cpu``, unless the launcher's arguments already choose a device."""
    return [] if any(a == "--device" or a.startswith("--device=") for a in args) else ["--device", "cpu"]


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def oracle(job_path: str, steps: int, seed: int = 0, env: dict | None = None,
           parts: int = 1) -> dict[str, np.ndarray]:
    """Single-process torch training on the same global batches, with the job's recipe
    (``worker.reference``): the reference answer. ``env``: the environment the job reads
    when it loads (as ``launch(..., env=)`` gives the cluster's workers), set for the
    duration and restored after. ``parts``: micro-batches per step (``worker.reference``)."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        model, _ = reference.train(job_path, steps, seed, parts)
        return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def assert_params_close(got: dict, want: dict, rtol: float) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        scale = float(np.abs(want[name]).max())
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=rtol * scale,
                                   err_msg=f"parameter {name}")


def check_tiny_mlp_run(run: Run, want: dict, steps: int, deaths: int | None = None) -> dict:
    """The promises of a BSP fault test on tests/jobs/tiny_mlp.py (200 samples, batch 24:
    9 steps an epoch, the last of 8 samples): the run succeeded, every sample of every
    epoch was applied exactly once, and the parameters are the oracle's."""
    assert run.rc == 0, run.stderr[-4000:]
    summary = run.summary
    assert summary["ok"], summary["failure"]
    if deaths is not None:
        assert len(summary["deaths"]) == deaths, summary["deaths"]
    full, rest = divmod(steps, 9)
    applied = [e["samples_applied"] for e in summary["per_epoch"]]
    assert applied == [200] * full + ([rest * 24] if rest else []), applied
    assert_params_close(run.params, want, rtol=1e-5)
    return summary
