"""Server failures and checkpoints: a lost shard costs time, never parameters.

BSP runs take a coordinated checkpoint every 10 steps. A lost server makes the
launcher (--recover) restart the cluster from the newest intact checkpoint; the
replayed steps give the same parameters as a run without the fault (the oracle, to
a relative 1e-5), and every epoch's samples are applied exactly once.
"""
import os
import shutil

import pytest

from cluster import JOBS, assert_params_close, launch, oracle

JOB = os.path.join(JOBS, "tiny_mlp.py")
STEPS = 60
CKPT = ["--checkpoint-every", "10", "--dead-after-s", "1.5"]
SLOW_TASKS = {"TINY_MLP_DELAY_S": "0.02"}


def check(run, steps=STEPS):
    assert run.rc == 0, run.stderr[-4000:]
    summary = run.summary
    epochs = [e["samples_applied"] for e in summary["per_epoch"]]
    full, rest = divmod(steps, 9)
    assert epochs == [200] * full + ([rest * 24] if rest else []), epochs
    assert_params_close(run.params, oracle(JOB, steps), rtol=1e-5)
    return summary


def test_server_killed_mid_run_is_recovered_from_the_last_checkpoint(tmp_path):
    run = launch(tmp_path, "--job", JOB, "--steps", str(STEPS), *CKPT, "--recover",
                 "--inject", "kill:server0@step=25", env=SLOW_TASKS, timeout_s=150)
    summary = check(run)
    (recovery,) = summary["recoveries"]
    assert recovery["lost"] == "server0" and recovery["resumed_from_step"] == 20
    assert recovery["steps_redone"] == recovery["at_step"] - 20 >= 5


@pytest.mark.slow
def test_a_worker_and_a_server_killed_together(tmp_path):
    run = launch(tmp_path, "--job", JOB, "--steps", str(STEPS), *CKPT, "--recover", "--respawn",
                 "--inject", "kill:worker1@step=25", "--inject", "kill:server0@step=25",
                 env=SLOW_TASKS, timeout_s=150)
    summary = check(run)
    (recovery,) = summary["recoveries"]
    assert recovery["lost"] == "server0" and recovery["resumed_from_step"] == 20
    assert "injected kill:worker1@step=25" in run.stderr      # both were really killed
    assert "injected kill:server0@step=25" in run.stderr


@pytest.mark.slow
def test_server_paused_past_the_timeout_is_recovered(tmp_path):
    # a hung server never exits by itself: the scheduler declares it dead, the run
    # stops, and --recover restarts the cluster from the checkpoint of step 20
    run = launch(tmp_path, "--job", JOB, "--steps", str(STEPS), *CKPT, "--recover",
                 "--inject", "pause:server1@step=25,for=30s", env=SLOW_TASKS, timeout_s=150)
    summary = check(run)
    (recovery,) = summary["recoveries"]
    assert recovery["lost"] == "server1" and recovery["resumed_from_step"] == 20


@pytest.mark.slow
def test_server_killed_while_writing_a_checkpoint_never_uses_it(tmp_path):
    # server 0 dies after writing version 20 to a temporary file, before the rename:
    # no manifest for 20 is ever written, so the recovery starts from 10
    run = launch(tmp_path, "--job", JOB, "--steps", str(STEPS), *CKPT, "--recover",
                 "--server-crash-at", "0:checkpoint@20", timeout_s=150)
    summary = check(run)
    assert summary["recoveries"][0]["resumed_from_step"] == 10
    assert summary["resumed_from"]["version"] == 10


def damage(path, how):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if how == "truncate" else data[:100] + b"\0" * 64 + data[164:])


@pytest.mark.slow
def test_corrupted_or_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    first = launch(tmp_path / "first", "--job", JOB, "--steps", "30", *CKPT)
    assert first.rc == 0, first.stderr[-3000:]
    for how in ("corrupt", "truncate"):
        out = tmp_path / how
        shutil.copytree(tmp_path / "first", out)           # the same 30 steps, damaged two ways
        damage(out / "checkpoints" / "v000030" / "shard-1.npz", how)
        run = launch(out, "--job", JOB, "--steps", str(STEPS), *CKPT, "--resume")
        summary = check(run)
        assert summary["resumed_from"]["version"] == 20
        assert "shard-1.npz does not match its sha256" in summary["resumed_from"]["skipped"][0]


@pytest.mark.slow
def test_disk_full_while_checkpointing_logs_and_goes_on(tmp_path):
    run = launch(tmp_path, "--job", JOB, "--steps", str(STEPS), *CKPT, "--fail-checkpoints")
    summary = check(run)
    assert "could not write its checkpoint of version 10" in run.stderr
    assert all(s["errors"]["checkpoint_failed"] == STEPS // 10 for s in summary["shards"])
    assert summary["checkpoint_committed"] == 0


@pytest.mark.slow
def test_resume_with_a_different_number_of_servers(tmp_path):
    first = launch(tmp_path, "--job", JOB, "--steps", "30", "--servers", "2", *CKPT)
    assert first.rc == 0, first.stderr[-3000:]
    run = launch(tmp_path, "--job", JOB, "--steps", str(STEPS), "--servers", "3", *CKPT, "--resume")
    summary = check(run)
    assert summary["resumed_from"]["version"] == 30 and summary["servers"] == 3


@pytest.mark.slow
def test_asp_server_loss_fails_the_run_naming_the_server(tmp_path):
    # SSP and ASP have no coordinated checkpoint (shards are never at one version):
    # losing a server loses its shard, and the run says so and stops
    run = launch(tmp_path, "--job", JOB, "--steps", str(STEPS), "--mode", "asp",
                 "--inject", "kill:server1@step=10", "--dead-after-s", "1.5", env=SLOW_TASKS)
    assert run.rc != 0
    assert "server1 exited with status -9; stopping the cluster" in run.stderr
