"""``python -m ps.k8s``: write the JobSet manifest of one cluster (see ``ps.k8s``).

    python -m ps.k8s --job examples/mlp_classifier.py --servers 2 --workers 4 \\
        --image ghcr.io/me/ps:1.0 -- --epochs 5 > ps.json
    kubectl apply -f ps.json

Flags after ``--`` go to the scheduler (the run's settings: --epochs, --mode, ...), as
with scripts/slurm/ps.sbatch; --worker-args and --server-args carry the workers' and the
servers' own. Bad arguments stop it with status 2, naming each problem.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys

from ps.k8s import DEFAULT_PORT, DEFAULT_RESOURCES, RUN_DIR, Spec, check, jobset


DESCRIPTION = """\
Write a Kubernetes JobSet (jobset.x-k8s.io/v1alpha2) that runs one parameter-server
cluster: a scheduler, S servers and M workers, one pod each, every pod running
`python -m ps` with the environment contract (PS_ROLE, PS_RANK, PS_SCHEDULER, ...) set.
Pods reach each other by the DNS names JobSet gives them; a server's or a worker's rank
is its Job's index. A failed worker pod is replaced and rejoins the run; a lost server
or scheduler restarts the whole JobSet (from the newest checkpoint, given --resume).
Flags after `--` go to the scheduler: the run's settings (--epochs, --mode, ...).
"""

EXAMPLE = """\
example:
  python -m ps.k8s --job examples/mlp_classifier.py --servers 2 --workers 4 \\
      --image ghcr.io/me/ps:1.0 --seed 1 -- --epochs 5 > ps.json
  kubectl apply -f ps.json              # needs the JobSet controller (docs/kubernetes.md)
  kubectl logs -f job/ps-scheduler-0    # the run's progress; its exit status is the result
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ps.k8s",
        usage="python -m ps.k8s --job JOB --servers S --workers M --image IMAGE [options] "
              "[-- SCHEDULER FLAGS...]",
        description=DESCRIPTION,
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", required=True, metavar="JOB",
                   help="the job file, as a path inside the image (the workers' PS_JOB)")
    p.add_argument("--servers", type=int, required=True, metavar="S", help="servers (shards)")
    p.add_argument("--workers", type=int, required=True, metavar="M", help="workers")
    p.add_argument("--image", required=True, metavar="IMAGE",
                   help="container image holding this repository and its dependencies, in "
                        "whose working directory `python -m ps` runs")
    p.add_argument("--name", default="ps",
                   help="the JobSet's name, prefix of every Job, pod and DNS name (default: ps)")
    p.add_argument("--namespace", default=None, metavar="NS",
                   help="namespace (default: the one kubectl uses)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="the workers' device (default: cpu)")
    p.add_argument("--gpus-per-worker", type=int, default=None, metavar="N",
                   help="nvidia.com/gpu each worker pod asks for (default: 0 with --device "
                        "cpu, 1 with cuda); a worker drives one")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, metavar="P",
                   help=f"the scheduler's port; each server binds P + 1 in its own pod "
                        f"(default: {DEFAULT_PORT})")
    for role, (cpu, memory) in DEFAULT_RESOURCES.items():
        p.add_argument(f"--{role}-cpu", default=cpu, metavar="CPU",
                       help=f"cores a {role} pod requests (default: {cpu})")
        p.add_argument(f"--{role}-memory", default=memory, metavar="MEM",
                       help=f"memory a {role} pod requests, and its limit (default: {memory})")
    p.add_argument("--max-restarts", type=int, default=3, metavar="N",
                   help="times the whole JobSet starts again after a failure it cannot "
                        "survive otherwise, such as a lost server or scheduler (default: 3)")
    p.add_argument("--worker-restarts", type=int, default=3, metavar="N",
                   help="times each worker's pod is replaced after it fails; the new pod "
                        "rejoins the running cluster with the same rank (default: 3)")
    p.add_argument("--volume-claim", default=None, metavar="CLAIM",
                   help=f"a PersistentVolumeClaim (ReadWriteMany) mounted at {RUN_DIR} in every "
                        f"pod; the scheduler and workers get --out {RUN_DIR}/NAME, so the "
                        "summary, params.npz and checkpoints outlive the pods")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="the containers' working directory (default: the image's WORKDIR)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="the run's seed, given to the scheduler and every worker")
    p.add_argument("--timeout-s", type=float, default=None, metavar="T",
                   help="every role's --timeout-s (default: theirs, 120 s); the cluster forms "
                        "only once every pod runs, image pulls included")
    p.add_argument("--worker-args", default="", metavar="FLAGS",
                   help="more flags for every worker, one string: --worker-args='--overlap'")
    p.add_argument("--server-args", default="", metavar="FLAGS",
                   help="more flags for every server, one string")
    p.add_argument("--format", choices=("json", "yaml"), default="json",
                   help="json (the default: kubectl takes it) or yaml (needs PyYAML)")
    p.add_argument("--out", default="-", metavar="FILE",
                   help="where to write the manifest (default: standard output)")
    return p


def parse(argv: list[str]) -> tuple[Spec, argparse.Namespace]:
    """The spec the flags describe; exits 2 through argparse, naming every problem."""
    cut = argv.index("--") if "--" in argv else len(argv)
    ours, scheduler_args = argv[:cut], argv[cut + 1:]
    p = parser()
    a = p.parse_args(ours)
    gpus = a.gpus_per_worker if a.gpus_per_worker is not None else int(a.device == "cuda")
    try:
        worker_args, server_args = shlex.split(a.worker_args), shlex.split(a.server_args)
    except ValueError as exc:
        p.error(f"--worker-args or --server-args: {exc}")
    spec = Spec(job=a.job, servers=a.servers, workers=a.workers, image=a.image, name=a.name,
                namespace=a.namespace, device=a.device, gpus_per_worker=gpus, port=a.port,
                resources={role: (getattr(a, f"{role}_cpu"), getattr(a, f"{role}_memory"))
                           for role in DEFAULT_RESOURCES},
                max_restarts=a.max_restarts, worker_restarts=a.worker_restarts,
                volume_claim=a.volume_claim, workdir=a.workdir, seed=a.seed,
                timeout_s=a.timeout_s, scheduler_args=scheduler_args,
                server_args=server_args, worker_args=worker_args)
    errors = check(spec)
    if any(arg == "--seed" or arg.startswith("--seed=") for arg in scheduler_args):
        errors.append("give --seed before `--`: the workers need the scheduler's seed too")
    if a.format == "yaml" and importlib.util.find_spec("yaml") is None:   # not a dependency
        errors.append("--format yaml needs PyYAML (pip install pyyaml); json needs nothing")
    if errors:
        p.error("\n  ".join(errors))
    if gpus > 1:
        print(f"python -m ps.k8s: warning: a worker drives one GPU; {gpus - 1} of each worker's "
              f"{gpus} stay idle (run more workers instead)", file=sys.stderr)
    return spec, a


def render(manifest: dict, fmt: str) -> str:
    """JSON, which needs nothing installed, or YAML, which is easier to read and edit."""
    if fmt == "yaml":
        import yaml
        return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)
    return json.dumps(manifest, indent=2) + "\n"


def main(argv=None) -> int:
    spec, a = parse(sys.argv[1:] if argv is None else list(argv))
    text = render(jobset(spec), a.format)
    if a.out == "-":
        sys.stdout.write(text)
    else:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
