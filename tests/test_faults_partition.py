"""Network partitions (--netns): links cut, in one or both directions, and flapping.

Every role runs in its own network namespace on a virtual bridge; the launcher takes a
role's link down (``partition``), adds a blackhole route in one direction (``cut``) or
toggles the link (``flap``). Each BSP run must end with the no-fault run's parameters
(the single-process oracle, to a relative 1e-5), apply every sample of every epoch
exactly once, and end before its deadline; afterwards no namespace or link of the run
is left. Skipped, with the reason, where namespaces cannot be made (not root, or
`ip netns add` fails).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cluster import JOBS, ROOT, check_tiny_mlp_run, kill_group, launch, oracle

JOB = os.path.join(JOBS, "tiny_mlp.py")
STEPS = 60
SLOW_TASKS = {"TINY_MLP_DELAY_S": "0.06"}     # ~60 ms steps: a fault lands mid-run
STALLED = 2          # steps a BSP run may still report after a link it needs went down
                     # (the step in flight, and one whose pushes had already left)


def _ip(*args) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10).stdout


def _ours() -> set[str]:
    """This project's namespaces and links (names start ps- / ps<id>h / psbr)."""
    names = {line.split()[0] for line in _ip("netns", "list").splitlines() if line.startswith("ps-")}
    links = {line.split(":")[1].strip().split("@")[0] for line in _ip("-o", "link").splitlines()}
    return names | {n for n in links if n.startswith("ps")}


@pytest.fixture(scope="module")
def netns():
    """Skip unless a network namespace can actually be created and deleted here."""
    if os.geteuid() != 0:
        pytest.skip("--netns needs root (network namespaces, a bridge, veth links)")
    probe = f"ps-probe-test-{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    except OSError as exc:
        pytest.skip(f"no `ip` command: {exc}")
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` fails here: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], timeout=10)


@pytest.fixture
def clean(netns):
    """Nothing of the run may outlive it: no namespace, bridge or veth."""
    before = _ours()
    yield
    assert _ours() - before == set(), "namespaces or links left behind"


@pytest.fixture(scope="module")
def reference():
    return oracle(JOB, STEPS)


def run_partitioned(tmp_path, *args, timeout_s=120):
    return launch(tmp_path, "--job", JOB, "--workers", "3", "--servers", "2", "--steps", str(STEPS),
                  "--netns", *args, env=SLOW_TASKS, timeout_s=timeout_s)


def check(run, reference, deaths):
    summary = check_tiny_mlp_run(run, reference, STEPS, deaths)
    (fault,) = summary["faults_injected"]
    assert fault["fired_at_s"] is not None and fault["healed_at_s"] is not None, fault
    return summary, fault


def test_worker_partitioned_past_the_timeout_is_fenced(tmp_path, clean, reference):
    run = run_partitioned(tmp_path, "--inject", "partition:worker1@step=10,for=3s",
                          "--dead-after-s", "1.5")
    summary, fault = check(run, reference, deaths=1)
    assert fault["detected_at_s"] is not None and fault["detected_at_s"] > fault["fired_at_s"]
    assert fault["recovery_s"] is not None
    assert "worker1 exited with status 3" in run.stderr        # healed, learnt it was fenced


@pytest.mark.slow
def test_worker_partitioned_shorter_than_the_timeout_changes_nothing(tmp_path, clean, reference):
    run = run_partitioned(tmp_path, "--inject", "partition:worker1@step=10,for=1s",
                          "--dead-after-s", "4")
    summary, fault = check(run, reference, deaths=0)
    assert fault["detected_at_s"] is None
    # BSP waited for the cut-off worker, if it held a lease then; if not (cut between its
    # report and its next lease), the others stole its queued tasks: steps completed
    # only through them
    stolen = summary["per_worker"][1]["stolen_from"]
    assert fault["steps_during"] <= STALLED or stolen >= fault["steps_during"] - STALLED, \
        (fault, stolen)
    # every role bound its own address on the bridge, none the loopback
    roles = json.loads((tmp_path / "cluster.json").read_text())["roles"]
    endpoints = [roles[r]["endpoint"] for r in ("scheduler", "server0", "server1")]
    assert all(e.startswith("tcp://10.77.") for e in endpoints), endpoints
    assert len({e.rsplit(":", 1)[0] for e in endpoints}) == 3       # one address per role


@pytest.mark.slow
def test_server_partitioned_shorter_than_the_timeout_changes_nothing(tmp_path, clean, reference):
    run = run_partitioned(tmp_path, "--inject", "partition:server0@step=10,for=1s",
                          "--dead-after-s", "4")
    summary, fault = check(run, reference, deaths=0)
    assert fault["detected_at_s"] is None and summary["recoveries"] == []
    assert fault["steps_during"] <= STALLED, fault        # nobody could complete a step


@pytest.mark.slow
def test_server_partitioned_past_the_timeout_recovers_from_a_checkpoint(tmp_path, clean, reference):
    # The scheduler judges server 0 lost; --recover restarts the cluster from the newest
    # checkpoint while the link is still down: server 0 registers once it heals.
    run = run_partitioned(tmp_path, "--inject", "partition:server0@step=20,for=3s",
                          "--dead-after-s", "1.5", "--checkpoint-every", "5", "--recover",
                          timeout_s=150)
    summary, fault = check(run, reference, deaths=0)
    (recovery,) = summary["recoveries"]
    assert recovery["lost"] == "server0"
    assert fault["detected_at_s"] is not None


@pytest.mark.slow
def test_one_way_cut_from_a_worker_to_a_server(tmp_path, clean, reference):
    # Worker 1 cannot reach server 0 (its pushes and pulls are retried), but its heartbeats
    # reach the scheduler: it is not judged dead, and the run waits for it.
    run = run_partitioned(tmp_path, "--inject", "cut:worker1->server0@step=10,for=2s",
                          "--dead-after-s", "3")
    summary, fault = check(run, reference, deaths=0)
    assert fault["steps_during"] <= STALLED, fault        # shard 0 waited for worker 1's push


@pytest.mark.slow
def test_a_flapping_link(tmp_path, clean, reference):
    # Down half of every second for 4 s: each cut is far shorter than the timeout, but TCP's
    # retransmission backoff can hold a heartbeat back for a few seconds after the link
    # returns, hence a timeout with room (3 s was declared dead once on a loaded machine).
    run = run_partitioned(tmp_path, "--inject", "flap:worker1@step=5,for=4s,period=1s",
                          "--dead-after-s", "6")
    summary, fault = check(run, reference, deaths=0)
    # The link really went down four times (and came back: healed, no death), and each
    # cut had an effect: the run stalled (worker 1's leased task held the BSP step), or
    # it went on only through worker 1's tasks stolen by the others (one task per worker
    # per step). A flap that did nothing would let ~8 steps of 60 ms through each
    # half-second cut, with nothing stolen (a run without faults steals nothing here).
    cuts = fault["steps_while_down"]
    assert len(cuts) == 4, fault
    stolen = summary["per_worker"][1]["stolen_from"]
    assert sum(max(0, steps - STALLED) for steps in cuts) <= stolen, (cuts, stolen)


# -- the namespaces themselves: cleaned up on Ctrl-C, after a crash, refused without root --

def _start(out, *args):
    return subprocess.Popen([sys.executable, "-m", "ps.launch", "--quiet", "--out", str(out),
                             "--job", JOB, "--steps", "100000", "--timeout-s", "30", "--netns", "--device", "cpu", *args],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_training(out, proc):
    deadline = time.monotonic() + 60
    while not (out / "cluster.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the cluster never formed"
        time.sleep(0.05)
    time.sleep(1.0)


@pytest.mark.slow
def test_ctrl_c_removes_every_namespace_and_link(tmp_path, clean):
    proc = _start(tmp_path)
    try:
        _wait_for_training(tmp_path, proc)
        assert any(n.startswith("ps-") for n in _ours())
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:   # say what the launcher was doing: its stacks
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            kill_group(proc)
            _, err = proc.communicate()
            raise AssertionError(f"the launcher did not stop within 30 s of SIGINT:\n{err[-4000:]}")
        assert proc.returncode == 130
    finally:
        kill_group(proc)
        proc.communicate()


@pytest.mark.slow
def test_what_a_killed_launcher_left_is_removed_by_the_next_run(tmp_path, clean):
    proc = _start(tmp_path / "crashed")
    try:
        _wait_for_training(tmp_path / "crashed", proc)
    finally:
        kill_group(proc)                  # SIGKILL: no teardown; the roles die with it
        proc.communicate()
    left = {n for n in _ours() if n.startswith("ps-")}
    assert left, "the killed run should have left its namespaces"
    run = launch(tmp_path / "next", "--job", JOB, "--steps", "5", "--netns")
    assert run.rc == 0, run.stderr[-4000:]
    assert not left & _ours()             # reaped (and the clean fixture checks the rest)


@pytest.mark.parametrize("broken,words", [
    ("not_root", "--netns needs root"),
    ("no_ip", "needs iproute2's `ip`"),
    ("no_netns", "network namespaces are not supported here"),
])
def test_netns_where_it_cannot_work_is_a_clear_error(tmp_path, monkeypatch, capsys, broken, words):
    from ps.launch import launcher, netns
    args = launcher.parse_args(["--job", JOB, "--out", str(tmp_path), "--netns"])
    if broken == "not_root":
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
    else:
        monkeypatch.setattr(os, "geteuid", lambda: 0)
    if broken == "no_ip":
        monkeypatch.setattr(shutil, "which", lambda name: None)
    if broken == "no_netns":
        monkeypatch.setattr(shutil, "which", lambda name: "/sbin/ip")

        def refuse(cmd, check=True):
            raise RuntimeError(f"{' '.join(cmd)}: Operation not permitted")
        monkeypatch.setattr(netns, "run", refuse)
    assert launcher.launch(args) == 2
    assert words in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "cluster.json")      # nothing was started


def test_link_faults_need_netns(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ps.launch", "--job", JOB, "--out", str(tmp_path),
                          "--inject", "partition:worker1@step=3,for=1s"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "need --netns" in out.stderr
    out = subprocess.run([sys.executable, "-m", "ps.launch", "--job", JOB, "--out", str(tmp_path),
                          "--netns", "--inject", "partition:worker5@step=3,for=1s"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no such role" in out.stderr
