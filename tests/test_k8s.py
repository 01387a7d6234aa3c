"""``python -m ps.k8s``: the JobSet manifest of one cluster, checked without a cluster.

Two oracles. Kubernetes' own JSON schemas (the kubernetes-validate package, strict: an
unknown or misspelled field fails) validate each replicated job's Job; JobSet itself is a
CRD those schemas do not know, so its few fields are asserted here. And each pod's
environment, resolved as the kubelet would (the downward API's job index, ``$(VAR)``
expansion), is read by the real contract (``ps.launch.contract.resolve``) and turned into
the role's command line by ``ps.__main__.command``, as ``python -m ps`` does in the pod:
it must name the right role and rank, reach the scheduler at its pod's DNS name, and bind
the port its container declares. No Kubernetes cluster is run.
"""
import copy
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # not tests/cluster.py, which imports torch: this file never needs it

from ps.__main__ import command  # noqa: E402
from ps.k8s import JOB_INDEX, Spec, jobset  # noqa: E402
from ps.k8s.__main__ import main  # noqa: E402
from ps.launch.contract import resolve  # noqa: E402

K8S_VERSIONS = ("1.25", "1.37")   # the oldest and newest schemas kubernetes-validate 1.37.0 ships
JOB = "examples/mlp_classifier.py"

# The smallest cluster, the default one, GPU workers, and a large one with every option.
SHAPES = {
    "s1-m1": Spec(job=JOB, servers=1, workers=1, image="ps:dev"),
    "cpu": Spec(job=JOB, servers=2, workers=4, image="ghcr.io/me/ps:1.0"),
    "cuda": Spec(job=JOB, servers=2, workers=3, image="ghcr.io/me/ps:1.0-cuda", device="cuda",
                 gpus_per_worker=1),
    "large": Spec(job=JOB, servers=8, workers=64,
                  image="registry.example.com:5000/ps@sha256:" + "a" * 64,
                  name="mlp-run", namespace="ml", device="cuda", gpus_per_worker=2, port=9000,
                  resources={"scheduler": ("500m", "512Mi"), "server": ("4", "16Gi"),
                             "worker": ("7.5", "30Gi")},
                  max_restarts=5, worker_restarts=10, volume_claim="ps-runs", workdir="/ps",
                  seed=7, timeout_s=600,
                  scheduler_args=["--epochs", "2", "--checkpoint-every", "20", "--resume"],
                  server_args=["--nonfinite", "skip"], worker_args=["--grad-dtype", "bfloat16"]),
}


@pytest.fixture(scope="module")
def kv():
    return pytest.importorskip("kubernetes_validate",
                               reason="pip install kubernetes-validate: Kubernetes' JSON schemas")


def as_job(replicated: dict, jobset_name: str) -> dict:
    """A replicated job's template as the full batch/v1 Job JobSet makes of it."""
    template = replicated["template"]
    metadata = {"name": f"{jobset_name}-{replicated['name']}-0", **template.get("metadata", {})}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": template["spec"]}


def pods(manifest: dict):
    """(role, job index, container, its DNS name) of every pod the JobSet will run. The
    name follows JobSet's documented rule, <jobset>-<replicatedJob>-<jobIndex>-<podIndex>
    .<subdomain>, rebuilt here rather than taken from ps.k8s."""
    name, subdomain = manifest["metadata"]["name"], manifest["spec"]["network"]["subdomain"]
    for rj in manifest["spec"]["replicatedJobs"]:
        pod = rj["template"]["spec"]["template"]["spec"]
        (box,) = pod["containers"]
        for j in range(rj["replicas"]):
            yield rj["name"], j, box, f"{name}-{rj['name']}-{j}-0.{subdomain}"


def kubelet_env(box: dict, job_index: int) -> dict:
    """The container's environment as the kubelet sets it: the JobSet job-index annotation
    through the downward API, and $(VAR) expanded from the variables defined before."""
    env, job_index_ref = {}, {"fieldRef": {"fieldPath": f"metadata.annotations['{JOB_INDEX}']"}}
    for var in box["env"]:
        if "valueFrom" in var:
            assert var["valueFrom"] == job_index_ref
            env[var["name"]] = str(job_index)
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
    return env


@pytest.mark.parametrize("shape", SHAPES)
def test_every_job_is_valid_against_the_kubernetes_schemas(kv, shape):
    manifest = jobset(SHAPES[shape])
    for rj in manifest["spec"]["replicatedJobs"]:
        for version in K8S_VERSIONS:
            kv.validate(as_job(rj, manifest["metadata"]["name"]), version, strict=True)


@pytest.mark.parametrize("breakage", ["misspelled field", "wrong type", "missing required field"])
def test_a_broken_job_fails_the_schema_check(kv, breakage):
    """The check above can fail: the same Job, spoiled in one place, is refused."""
    job = as_job(jobset(SHAPES["cpu"])["spec"]["replicatedJobs"][1], "ps")
    kv.validate(job, K8S_VERSIONS[0], strict=True)
    pod = job["spec"]["template"]["spec"]
    if breakage == "misspelled field":
        pod["restartPolicyy"] = pod.pop("restartPolicy")
    elif breakage == "wrong type":
        pod["containers"][0]["ports"][0]["containerPort"] = "7701"
    else:
        del pod["containers"][0]["name"]
    with pytest.raises(kv.ValidationError):
        kv.validate(job, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_jobset_has_one_replicated_job_per_role(shape):
    spec = SHAPES[shape]
    manifest = jobset(spec)
    assert (manifest["apiVersion"], manifest["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    assert manifest["metadata"] == ({"name": spec.name, "namespace": spec.namespace}
                                    if spec.namespace else {"name": spec.name})
    js = manifest["spec"]
    assert js["network"] == {"enableDNSHostnames": True, "subdomain": spec.name}
    assert js["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["scheduler"]}
    assert js["failurePolicy"] == {"maxRestarts": spec.max_restarts}
    assert [(rj["name"], rj["replicas"]) for rj in js["replicatedJobs"]] == [
        ("scheduler", 1), ("server", spec.servers), ("worker", spec.workers)]
    for rj in js["replicatedJobs"]:
        job = rj["template"]["spec"]
        # One pod per Job, Indexed: its host is <job>-0, the pod index 0 of the DNS names.
        assert (job["completionMode"], job["completions"], job["parallelism"]) == ("Indexed", 1, 1)
        assert job["backoffLimit"] == (spec.worker_restarts if rj["name"] == "worker" else 0)
        assert job["template"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("shape", SHAPES)
def test_each_pod_s_environment_names_its_role_rank_and_scheduler(shape):
    spec = SHAPES[shape]
    manifest = jobset(spec)
    (scheduler_dns,) = [dns for role, _, _, dns in pods(manifest) if role == "scheduler"]
    seen = []
    for role, j, box, dns in pods(manifest):
        env = kubelet_env(box, j)
        got = resolve(env)
        assert (got.role, got.scheduler) == (role, f"tcp://{scheduler_dns}:{spec.port}")
        assert got.rank == (None if role == "scheduler" else j)
        argv = command(got, env, box["args"])     # what `python -m ps` execs in the pod
        (port,) = [p["containerPort"] for p in box.get("ports", [])] or [None]
        if role == "scheduler":
            assert (got.servers, got.workers) == (spec.servers, spec.workers)
            assert argv[:2] == ["-m", "ps.scheduler"] and flag(argv, "--bind") == f"tcp://*:{port}"
            assert port == spec.port
        elif role == "server":
            assert argv[:2] == ["-m", "ps.server"] and flag(argv, "--shard") == str(j)
            assert flag(argv, "--bind") == f"tcp://*:{port}"
            assert flag(argv, "--advertise") == f"tcp://{dns}:{port}"   # its own pod's name
        else:
            assert argv[:2] == ["-m", "worker"] and flag(argv, "--id") == str(j)
            assert (flag(argv, "--job"), flag(argv, "--device")) == (spec.job, spec.device)
        seen.append((role, got.rank))
    expected = ([("scheduler", None)] + [("server", k) for k in range(spec.servers)]
                + [("worker", w) for w in range(spec.workers)])
    assert seen == expected


def flag(argv: list, name: str):
    """The value of the last ``name`` in argv (argparse keeps the last)."""
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]


def test_the_roles_accept_the_flags_they_are_given():
    """The scheduler's and the servers' own argument parsers take their command lines,
    extras included (the worker's imports torch; its flags are checked by value)."""
    from ps.scheduler.config import parse_args as scheduler_args
    from ps.server.config import parse_args as server_args
    spec = SHAPES["large"]
    argv = {role: command(resolve(kubelet_env(box, j)), kubelet_env(box, j), box["args"])
            for role, j, box, _ in pods(jobset(spec)) if j == 0}
    scheduler = scheduler_args(argv["scheduler"][2:])
    assert (scheduler.servers, scheduler.workers, scheduler.seed) == (8, 64, 7)
    assert (scheduler.out, scheduler.resume) == ("/ps-run/mlp-run", True)
    assert server_args(argv["server"][2:]).timeout_s == 600
    assert argv["worker"][argv["worker"].index("--threads") + 1] == "7"   # whole cores of 7.5
    assert argv["worker"][-2:] == ["--grad-dtype", "bfloat16"]


def test_gpus_are_asked_for_by_workers_only():
    for shape, gpus in (("cpu", None), ("cuda", "1"), ("large", "2")):
        for role, _, box, _ in pods(jobset(SHAPES[shape])):
            limit = box["resources"]["limits"].get("nvidia.com/gpu")
            assert limit == (gpus if role == "worker" else None), (shape, role)
    worker = jobset(SHAPES["cuda"])["spec"]["replicatedJobs"][2]["template"]["spec"]["template"]
    assert worker["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_the_command_line_writes_the_manifest(tmp_path, capsys):
    argv = ["--job", JOB, "--servers", "2", "--workers", "4", "--image", "ghcr.io/me/ps:1.0"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == jobset(SHAPES["cpu"])
    out = tmp_path / "ps.json"
    assert main(argv + ["--device", "cuda", "--workers", "3", "--image", "ghcr.io/me/ps:1.0-cuda",
                        "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == jobset(SHAPES["cuda"])
    assert main(argv + ["--seed", "7", "--worker-args=--overlap", "--", "--epochs", "3"]) == 0
    boxes = {role: box for role, j, box, _ in pods(json.loads(capsys.readouterr().out)) if j == 0}
    assert boxes["scheduler"]["args"] == ["--seed", "7", "--epochs", "3"]
    assert boxes["worker"]["args"][-3:] == ["--seed", "7", "--overlap"]


def test_yaml_output_is_the_same_manifest(tmp_path):
    yaml = pytest.importorskip("yaml")
    out = tmp_path / "ps.yaml"
    main(["--job", JOB, "--servers", "1", "--workers", "1", "--image", "ps:dev", "--format", "yaml",
          "--out", str(out)])
    assert yaml.safe_load(out.read_text()) == jobset(SHAPES["s1-m1"])


def test_python_m_ps_k8s_runs_and_never_imports_torch():
    help_text = subprocess.run([sys.executable, "-m", "ps.k8s", "--help"], cwd=ROOT, timeout=30,
                               capture_output=True, text=True, check=True).stdout
    assert "JobSet" in help_text and "--gpus-per-worker" in help_text
    probe = "import sys, ps.k8s.__main__; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT, timeout=30, capture_output=True,
                          text=True, check=True).stdout.strip() == "False"


GOOD = ["--job", JOB, "--servers", "2", "--workers", "2", "--image", "ps:dev"]


@pytest.mark.parametrize("change, message", [
    (["--servers", "0"], "--servers and --workers must be >= 1"),
    (["--workers", "-1"], "--servers and --workers must be >= 1"),
    (["--image", ""], "is not an image reference"),
    (["--job", ""], "--job needs"),
    (["--device", "cuda", "--gpus-per-worker", "0"], "--device cuda needs --gpus-per-worker >= 1"),
    (["--gpus-per-worker", "1"], "--gpus-per-worker needs --device cuda"),
    (["--name", "My_Run"], "--name 'My_Run' must be lower-case"),
    (["--name", "a" * 50], "is too long"),
    (["--namespace", "ML"], "is not a namespace name"),
    (["--port", "0"], "--port 0 must be in"),
    (["--worker-cpu", "four"], "--worker-cpu 'four' is not a CPU quantity"),
    (["--server-memory", "4GB"], "--server-memory '4GB' is not a memory quantity"),
    (["--max-restarts", "-1"], "must be >= 0"),
    (["--worker-args", "'unclosed"], "--worker-args"),
    (["--device", "tpu"], "invalid choice"),
    (["--", "--epochs", "2", "--seed", "3"], "give --seed before `--`"),
])
def test_bad_arguments_exit_2_naming_the_problem(capsys, change, message):
    with pytest.raises(SystemExit) as stop:
        main(GOOD + change)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_the_image_is_required(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--job", JOB, "--servers", "2", "--workers", "2"])
    assert stop.value.code == 2 and "--image" in capsys.readouterr().err


def test_every_problem_is_named_at_once(capsys):
    with pytest.raises(SystemExit):
        main(GOOD + ["--servers", "0", "--name", "Bad", "--worker-cpu", "x"])
    err = capsys.readouterr().err
    assert "--servers" in err and "--name" in err and "--worker-cpu" in err


def test_the_kubelet_stand_in_takes_only_the_job_index():
    """kubelet_env resolves the downward API only for JobSet's job index: a rank taken
    from any other field is refused, so the contract test cannot pass on a made-up rank."""
    box = copy.deepcopy(jobset(SHAPES["cpu"])["spec"]["replicatedJobs"][1]["template"]["spec"]
                        ["template"]["spec"]["containers"][0])
    box["env"][2]["valueFrom"]["fieldRef"]["fieldPath"] = "metadata.name"
    with pytest.raises(AssertionError):
        kubelet_env(box, 0)
