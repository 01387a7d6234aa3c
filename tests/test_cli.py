"""Command lines: every role has a useful --help; bad invocations fail fast and clearly."""
import os
import subprocess
import sys

import pytest

from cluster import ROOT, launch


@pytest.mark.parametrize("module,usage,flags", [
    ("ps.scheduler", "python -m ps.scheduler",
     ("--servers", "--workers", "--mode", "--staleness", "--bind", "--out", "--dead-after-s")),
    ("ps.server", "python -m ps.server",
     ("--scheduler", "--bind", "--shard", "--timeout-s", "--nonfinite")),
    ("worker", "python -m worker",
     ("--scheduler", "--job", "--id", "--device", "--seed", "--crash-at")),
    ("ps.launch", "scripts/start_cluster.sh",
     ("--job", "--servers", "--workers", "--mode", "--inject", "--respawn", "--netns")),
    ("worker.reference", "python -m worker.reference", ("--job", "--steps", "--parts", "--out")),
])
def test_help(module, usage, flags):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.startswith(f"usage: {usage} "), out.stdout[:200]
    listed = {line.split()[0].rstrip(",") for line in out.stdout.splitlines()
              if line.startswith("  --")}                      # each option's own line
    assert set(flags) <= listed, set(flags) - listed


def test_start_cluster_help_lists_the_flags():
    out = subprocess.run([os.path.join(ROOT, "scripts", "start_cluster.sh"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--job", "--servers", "--workers", "--mode", "--staleness", "--steps", "--epochs",
                 "--seed", "--device", "--out", "--quiet"):
        assert flag in out.stdout


def test_missing_job_file_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ps.launch", "--job", str(tmp_path / "nope.py")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "does not exist" in out.stderr


def test_broken_job_fails_the_run_naming_the_role(tmp_path):
    job = tmp_path / "broken.py"
    job.write_text("BATCH_SIZE = 4\n")            # no model, no data, no loss
    run = launch(tmp_path / "out", "--job", str(job), "--steps", "2", timeout_s=60)
    assert run.rc != 0
    assert "does not define" in run.stderr and "worker" in run.stderr


def test_ctrl_c_stops_every_role(tmp_path):
    import json
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "-m", "ps.launch", "--quiet", "--out", str(tmp_path),
                             "--steps", "100000"], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "cluster.json").exists():
            assert time.monotonic() < deadline, "cluster.json never appeared"
            time.sleep(0.05)
        time.sleep(1.0)
        pids = [r["pid"] for r in json.loads((tmp_path / "cluster.json").read_text())["roles"].values()]
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:   # say what the launcher was doing: its stacks
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            raise AssertionError(f"the launcher did not stop within 30 s of SIGINT:\n{err[-3000:]}")
        assert proc.returncode == 130
        for pid in pids:           # every role is gone (reaped by the launcher)
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
