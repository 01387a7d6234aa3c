"""A Kubernetes JobSet that runs one cluster: the manifest as a dict (``python -m ps.k8s``).

JobSet (``jobset.x-k8s.io``, a Kubernetes SIG project installed as a CRD) is a group of
Jobs that start, succeed, fail and restart together. Ours has three replicated jobs, each
Job one pod running ``python -m ps``, which becomes the role its environment names
(``ps.launch.contract``):

    scheduler   1 Job    PS_ROLE=scheduler, PS_SERVERS=S, PS_WORKERS=M; binds PORT
    server      S Jobs   PS_ROLE=server, PS_RANK=the Job's index; binds PORT + 1
    worker      M Jobs   PS_ROLE=worker, PS_RANK=the Job's index, PS_JOB

No pod needs another's IP address. With ``network.enableDNSHostnames`` JobSet puts every
pod behind a headless service, under a DNS name known before the pod exists:
``<jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>``. The scheduler's name is
every pod's PS_SCHEDULER, and each server advertises its own. The rank is the Job's
index, which JobSet writes on each pod as the annotation ``jobset.sigs.k8s.io/job-index``
and the downward API hands to PS_RANK, so a pod that replaces a lost one keeps its rank.

Pure: ``check(spec)`` says what is wrong with a ``Spec`` and ``jobset(spec)`` builds the
manifest; ``ps.k8s.__main__`` turns flags into a ``Spec`` and writes JSON or YAML.
docs/kubernetes.md explains the manifest and its failure behaviour.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

API_VERSION = "jobset.x-k8s.io/v1alpha2"
JOB_INDEX = "jobset.sigs.k8s.io/job-index"   # annotation JobSet sets on each pod: its Job's index
GPU = "nvidia.com/gpu"                       # the resource the NVIDIA device plugin offers
RUN_DIR = "/ps-run"                          # where --volume-claim is mounted in every pod
DEFAULT_PORT = 7700                          # the scheduler's; servers bind PORT + 1 (as --hosts)
ROLES = ("scheduler", "server", "worker")    # also the replicatedJobs' names
DEFAULT_RESOURCES = {                        # role -> (cpu, memory) requested
    "scheduler": ("1", "1Gi"),               # bookkeeping only: no tensors
    "server": ("2", "4Gi"),                  # a shard's parameters and optimizer state
    "worker": ("4", "8Gi"),                  # the model, a batch, torch itself
}
MAX_NAME = 63                # a pod name and its hostname are DNS labels of at most 63 characters
POD_SUFFIX = "-abcde"        # the Job controller's random suffix, as JobSet's webhook counts it

DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")    # a Service's or Job's name
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # a namespace's or claim's name
CPU = re.compile(r"(\d+(\.\d+)?|\d+m)")                  # 4, 0.5 or 500m
MEMORY = re.compile(r"\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")


@dataclass
class Spec:
    """One cluster on Kubernetes: what ``python -m ps.k8s`` was asked for."""
    job: str                             # the job file, as a path inside the image
    servers: int
    workers: int
    image: str
    name: str = "ps"                     # the JobSet's name, prefix of every pod's
    namespace: str | None = None
    device: str = "cpu"                  # the workers' --device: cpu or cuda
    gpus_per_worker: int = 0
    port: int = DEFAULT_PORT
    resources: dict = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    max_restarts: int = 3                # restarts of the whole JobSet
    worker_restarts: int = 3             # pods each worker's Job replaces before it fails
    volume_claim: str | None = None      # a PersistentVolumeClaim mounted at RUN_DIR
    workdir: str | None = None           # the containers' working directory (default: the image's)
    seed: int | None = None              # the scheduler's and the workers' --seed
    timeout_s: float | None = None       # every role's --timeout-s
    scheduler_args: list = field(default_factory=list)
    server_args: list = field(default_factory=list)
    worker_args: list = field(default_factory=list)


def check(spec: Spec) -> list[str]:
    """Everything wrong with ``spec``, one sentence each; empty when it is fine."""
    errors = []
    if spec.servers < 1 or spec.workers < 1:
        errors.append(f"--servers and --workers must be >= 1 "
                      f"(got {spec.servers} and {spec.workers})")
    if not spec.image or re.search(r"\s", spec.image):
        errors.append(f"--image {spec.image!r} is not an image reference (e.g. ghcr.io/me/ps:1.0)")
    if not spec.job:
        errors.append("--job needs the job file's path inside the image")
    if not DNS_1035.fullmatch(spec.name):
        errors.append(f"--name {spec.name!r} must be lower-case letters, digits and '-', "
                      "starting with a letter and ending with a letter or digit")
    else:
        longest = max((pod_name(spec, role, n - 1) + POD_SUFFIX
                       for role, n in replicas(spec).items()), key=len)
        if len(longest) > MAX_NAME:
            errors.append(f"--name {spec.name!r} is too long: pod names such as {longest!r} "
                          f"would pass {MAX_NAME} characters")
    if spec.namespace is not None and not (DNS_1123.fullmatch(spec.namespace)
                                           and len(spec.namespace) <= MAX_NAME):
        errors.append(f"--namespace {spec.namespace!r} is not a namespace name")
    if not 0 < spec.port < 65535:
        errors.append(f"--port {spec.port} must be in [1, 65534] (servers bind PORT + 1)")
    if spec.device not in ("cpu", "cuda"):
        errors.append(f"--device {spec.device!r} must be cpu or cuda")
    if spec.device == "cuda" and spec.gpus_per_worker < 1:
        errors.append("--device cuda needs --gpus-per-worker >= 1")
    if spec.device == "cpu" and spec.gpus_per_worker != 0:
        errors.append("--gpus-per-worker needs --device cuda (a CPU worker would leave them idle)")
    for role, (cpu, memory) in spec.resources.items():
        if not (CPU.fullmatch(cpu) and cores(cpu) > 0):
            errors.append(f"--{role}-cpu {cpu!r} is not a CPU quantity (4, 0.5 or 500m)")
        if not MEMORY.fullmatch(memory):
            errors.append(f"--{role}-memory {memory!r} is not a memory quantity (512Mi, 8Gi)")
    if spec.max_restarts < 0 or spec.worker_restarts < 0:
        errors.append("--max-restarts and --worker-restarts must be >= 0")
    if spec.volume_claim is not None and not DNS_1123.fullmatch(spec.volume_claim):
        errors.append(f"--volume-claim {spec.volume_claim!r} is not a claim name")
    return errors


def cores(cpu: str) -> float:
    """A CPU quantity in cores: ``500m`` is 0.5."""
    return int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)


def cpu_threads(cpu: str) -> int:
    """Torch threads for a CPU request: its whole cores, at least one. Without --threads a
    worker takes torch's default, the node's core count, not its share of them."""
    return max(1, int(cores(cpu)))


def replicas(spec: Spec) -> dict[str, int]:
    """How many Jobs (so pods) each role has."""
    return {"scheduler": 1, "server": spec.servers, "worker": spec.workers}


def pod_name(spec: Spec, role: str, index) -> str:
    """The hostname of the pod of Job ``index`` of ``role``: JobSet names the Job
    ``<jobset>-<replicatedJob>-<index>``, and an Indexed Job names its pod's host
    ``<job>-<completion index>``, 0 for our one-pod Jobs."""
    return f"{spec.name}-{role}-{index}-0"


def dns_name(spec: Spec, role: str, index) -> str:
    """The pod's name in DNS: its hostname under the JobSet's subdomain (the headless
    service JobSet makes), which the namespace's DNS search path completes."""
    return f"{pod_name(spec, role, index)}.{spec.name}"


def scheduler_address(spec: Spec) -> str:
    """PS_SCHEDULER: where every role finds the scheduler."""
    return f"tcp://{dns_name(spec, 'scheduler', 0)}:{spec.port}"


def environment(spec: Spec, role: str) -> list[dict]:
    """The role's environment contract. Order matters: Kubernetes expands ``$(PS_RANK)``
    only from variables defined earlier in the list."""
    env = [{"name": "PS_ROLE", "value": role},
           {"name": "PS_SCHEDULER", "value": scheduler_address(spec)}]
    if role == "scheduler":
        env += [{"name": "PS_SERVERS", "value": str(spec.servers)},
                {"name": "PS_WORKERS", "value": str(spec.workers)}]
    else:
        env.append({"name": "PS_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{JOB_INDEX}']"}}})
    if role == "server":
        env += [{"name": "PS_PORT", "value": str(spec.port + 1)},
                {"name": "PS_ADVERTISE", "value": dns_name(spec, "server", "$(PS_RANK)")}]
    if role == "worker":
        env.append({"name": "PS_JOB", "value": spec.job})
    env.append({"name": "PYTHONUNBUFFERED", "value": "1"})   # logs reach `kubectl logs` at once
    return env


def arguments(spec: Spec, role: str) -> list[str]:
    """The flags ``python -m ps`` passes on to the role, after those it derives itself."""
    out = ["--out", f"{RUN_DIR}/{spec.name}"] if spec.volume_claim else []
    seed = ["--seed", str(spec.seed)] if spec.seed is not None else []
    timeout = ["--timeout-s", f"{spec.timeout_s:g}"] if spec.timeout_s is not None else []
    if role == "scheduler":
        return out + seed + timeout + list(spec.scheduler_args)
    if role == "server":
        return timeout + list(spec.server_args)
    cpu, _ = spec.resources["worker"]
    return (["--device", spec.device, "--threads", str(cpu_threads(cpu))] + out + seed
            + timeout + list(spec.worker_args))


def container(spec: Spec, role: str) -> dict:
    """One container running ``python -m ps`` with the role's environment, port and resources."""
    cpu, memory = spec.resources[role]
    limits = {"memory": memory}          # no CPU limit: throttling slows a step, it saves nothing
    if role == "worker" and spec.gpus_per_worker:
        limits[GPU] = str(spec.gpus_per_worker)
    box = {"name": role, "image": spec.image, "command": ["python", "-m", "ps"],
           "args": arguments(spec, role), "env": environment(spec, role),
           "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}}
    if role != "worker":
        box["ports"] = [{"name": role, "containerPort": spec.port + (role == "server"),
                         "protocol": "TCP"}]
    if spec.workdir:
        box["workingDir"] = spec.workdir
    if spec.volume_claim:
        box["volumeMounts"] = [{"name": "run", "mountPath": RUN_DIR}]
    return box


def pod_template(spec: Spec, role: str) -> dict:
    """The pod of one Job. ``Never``: its container is not restarted in place; a failed
    pod is replaced by a new one (or not) as its Job's backoffLimit says, and its log stays."""
    pod = {"restartPolicy": "Never",
           # Service links would put PS_PORT=tcp://... into every pod of a namespace with a
           # Service called "ps": the contract's own variable, with another meaning.
           "enableServiceLinks": False,
           "containers": [container(spec, role)]}
    if spec.volume_claim:
        pod["volumes"] = [{"name": "run",
                           "persistentVolumeClaim": {"claimName": spec.volume_claim}}]
    if role == "worker" and spec.gpus_per_worker:
        # GPU nodes are often tainted so that only pods asking for GPUs land there.
        pod["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": pod}


def replicated_job(spec: Spec, role: str) -> dict:
    """``replicas`` Jobs of one pod each. A worker's Job replaces a failed pod up to
    ``worker_restarts`` times, and the new pod rejoins as a replacement with the same rank;
    a server or the scheduler cannot rejoin a running cluster, so its Job fails at once
    and the JobSet's failure policy restarts everything."""
    backoff = spec.worker_restarts if role == "worker" else 0
    return {"name": role, "replicas": replicas(spec)[role], "template": {"spec": {
        "completionMode": "Indexed", "completions": 1, "parallelism": 1,
        "backoffLimit": backoff, "template": pod_template(spec, role)}}}


def jobset(spec: Spec) -> dict:
    """The whole manifest. The run succeeds when the scheduler's Job does (its exit status
    is the run's result, as under Slurm); JobSet then deletes pods still running."""
    metadata = {"name": spec.name}
    if spec.namespace:
        metadata["namespace"] = spec.namespace
    return {
        "apiVersion": API_VERSION, "kind": "JobSet", "metadata": metadata,
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": spec.name},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": ["scheduler"]},
            "failurePolicy": {"maxRestarts": spec.max_restarts},
            "replicatedJobs": [replicated_job(spec, role) for role in ROLES],
        },
    }
