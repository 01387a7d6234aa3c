"""The Ray engine's own logic, without Ray: its flags, the shared-storage check, a lost
host read as a killed process, the servers' memory request (tests/test_ray.py runs it on
a simulated Ray cluster)."""
import os
import signal
import subprocess
import sys
import types

import pytest

from cluster import ROOT

from ps.launch import launcher, ray_engine, ray_host

JOB = os.path.join(ROOT, "tests", "jobs", "tiny_mlp.py")


def parse(*argv):
    return launcher.parse_args(["--job", JOB, "--out", "/tmp/x", *argv])


def test_ray_flags():
    args = parse("--ray", "auto", "--ray-resources", "worker:a100=1",
                 "--ray-resources", "server:ssd=0.5", "--ray-resources", "worker:zone_a=2")
    assert args.ray_resources == {"worker": {"a100": 1.0, "zone_a": 2.0}, "server": {"ssd": 0.5}}
    assert args.threads == 1                 # a worker asks Ray for one CPU unless told
    assert parse("--ray", "auto", "--threads", "4").threads == 4


@pytest.mark.parametrize("argv, words", [
    (["--ray", "auto", "--netns"], "exclude each other"),
    (["--ray", "auto", "--hosts", "h.txt"], "exclude each other"),
    (["--ray-resources", "worker:a=1"], "needs --ray"),
    (["--ray", "auto", "--ray-resources", "scheduler:a=1"], "ROLE:NAME=AMOUNT"),
    (["--ray", "auto", "--ray-resources", "worker:a=0"], "AMOUNT > 0"),
    (["--ray", "auto", "--ray-resources", "worker:a"], "ROLE:NAME=AMOUNT"),
])
def test_bad_ray_flags_are_refused(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_without_ray_the_launcher_says_how_to_install_it(tmp_path):
    # a Python that cannot import ray (a stand-in module that raises ImportError)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n")
    out = subprocess.run([sys.executable, "-m", "ps.launch", "--job", JOB, "--ray", "local",
                          "--out", str(tmp_path / "run"), "--quiet"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert out.returncode != 0
    assert "scripts/setup.sh --ray" in out.stderr


def test_server_memory_is_its_shard_six_times_over_plus_the_interpreter():
    assert ray_engine.server_memory(10_000_000, 4) == 6 * 4 * 2_500_000 + (256 << 20)
    assert ray_engine.server_memory(10, 4) == 6 * 4 * 3 + (256 << 20)     # rounded up


def test_job_parameters_counts_the_model_in_a_child_process():
    from worker.job import load_job
    model, _ = load_job(JOB).build(0)
    assert ray_engine.job_parameters(JOB) == sum(p.numel() for p in model.parameters())


class FakeRay:
    """Just what RayProcess and check_shared call: ``get`` answers a call at once."""
    class exceptions:
        class RayActorError(Exception):
            pass

        class ActorUnavailableError(Exception):
            pass

        class GetTimeoutError(Exception):
            pass

    @staticmethod
    def get(value, timeout=None):
        if isinstance(value, Exception):
            raise value
        return value


def host(**methods):
    """An actor handle whose ``method.remote(*args)`` returns ``methods[name](*args)``."""
    return types.SimpleNamespace(**{
        name: types.SimpleNamespace(remote=fn) for name, fn in methods.items()})


def test_a_host_that_is_gone_reads_as_a_process_killed_by_sigkill():
    gone = FakeRay.exceptions.RayActorError("the actor died")
    status = iter([None, gone])
    proc = ray_host.RayProcess(FakeRay, host(poll=lambda: next(status), signal=lambda sig: None),
                                 1234, {"node": "n1", "address": "10.0.0.2", "staging": None})
    assert proc.poll() is None
    assert proc.poll() == -signal.SIGKILL and proc.returncode == -signal.SIGKILL
    proc.kill()                                # no call to a host that is gone
    assert proc.wait(0.1) == -signal.SIGKILL


def test_a_running_process_times_out_as_popen_does():
    proc = ray_host.RayProcess(FakeRay, host(poll=lambda: None), 1, {"node": "n", "staging": None})
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.1)


def test_a_checkpoint_dir_a_server_node_cannot_see_is_refused(tmp_path):
    place = object.__new__(ray_engine.RayPlacement)
    place.ray, place.args = FakeRay, types.SimpleNamespace(servers=2)
    seen = host(sees=lambda path, token: open(path).read() == token)
    blind = host(sees=lambda path, token: False)
    place._host = lambda name: {"server0": (seen, {"address": "10.0.0.2", "node": "a" * 40}),
                                "server1": (blind, {"address": "10.0.0.3", "node": "b" * 40})}[name]
    with pytest.raises(RuntimeError, match=r"not shared: server1's node \(10\.0\.0\.3"):
        place.check_shared(str(tmp_path / "ckpt"))
    assert os.listdir(tmp_path / "ckpt") == []           # the token is removed either way
    place._host = lambda name: (seen, {"address": "10.0.0.2", "node": "a" * 40})
    place.check_shared(str(tmp_path / "ckpt"))           # every node sees it: no complaint


def test_each_role_asks_ray_for_what_it_needs():
    pytest.importorskip("ray", reason="Ray is not installed (scripts/setup.sh --ray)")
    asked = {}

    class Actor:
        @staticmethod
        def options(**options):
            return types.SimpleNamespace(remote=lambda name, staging: asked.setdefault(
                name, (options, staging)))

    fake = types.SimpleNamespace(
        remote=lambda **kw: (lambda cls: Actor),
        get_runtime_context=lambda: types.SimpleNamespace(get_node_id=lambda: "ab" * 28))
    for device, worker in (("cpu", {"num_cpus": 3}), ("cuda", {"num_gpus": 1})):
        asked.clear()
        args = types.SimpleNamespace(servers=2, workers=1, device=device, threads=3,
                                     ray_resources={"worker": {"pool": 1.0}})
        place = ray_engine.RayPlacement(fake, args, parameters=1_000_000)
        place.group = "the servers' placement group"
        for name in ("scheduler", "server1", "worker0"):
            place._new_host(name)
        scheduler, server, work = (asked[n] for n in ("scheduler", "server1", "worker0"))
        assert scheduler[0]["scheduling_strategy"].node_id == "ab" * 28   # the launcher's node
        assert scheduler[1] is False                                     # writes --out itself
        assert server[0]["memory"] == ray_engine.server_memory(1_000_000, 2)
        assert server[0]["num_cpus"] == 1.0 and server[1] is True
        strategy = server[0]["scheduling_strategy"]
        assert (strategy.placement_group, strategy.placement_group_bundle_index) == (
            "the servers' placement group", 1)
        assert work[0] == {**worker, "resources": {"pool": 1.0}} and work[1] is True


def test_an_address_where_no_ray_answers_fails_at_once(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (scripts/setup.sh --ray)")
    out = subprocess.run([sys.executable, "-m", "ps.launch", "--job", JOB, "--ray", "127.0.0.1:1",
                          "--out", str(tmp_path), "--quiet"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert "nothing answers at 127.0.0.1:1" in out.stderr
