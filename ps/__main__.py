"""``python -m ps [ARGS...]``: become the role the environment names (``ps.launch.contract``).

What Slurm's ``srun``, a Kubernetes pod or any launcher starts everywhere: this reads
PS_ROLE, PS_RANK and PS_SCHEDULER (or their aliases: SLURM_PROCID, TF_CONFIG, DMLC_*),
and replaces itself with ``python -m ps.scheduler``, ``python -m ps.server`` or
``python -m worker``, the role's own flags first and ARGS after them (``--out``,
``--steps``, ``--timeout-s``...). A worker's job file is PS_JOB (or ``--job`` in ARGS).

Where the roles listen: the scheduler binds the port of PS_SCHEDULER. A server binds
PS_BIND when set; otherwise, with the scheduler on this machine's loopback, a free
loopback port, and else ``tcp://*:PS_PORT`` (default 5600), advertising
``tcp://PS_ADVERTISE`` or this host's name. Conflicting settings stop it with status 2,
naming them.
"""
from __future__ import annotations

import os
import socket
import sys

from ps.launch.contract import ContractError, Role, resolve

DEFAULT_SERVER_PORT = 5600
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def command(role: Role, env, extra: list[str]) -> list[str]:
    """The ``python -m ...`` arguments of the role (after the interpreter)."""
    host, _, port = role.scheduler[len("tcp://"):].rpartition(":")
    local = host in LOOPBACK
    if role.role == "scheduler":
        bind = env.get("PS_BIND") or f"tcp://{'127.0.0.1' if local else '*'}:{port}"
        return ["-m", "ps.scheduler", "--servers", str(role.servers), "--workers",
                str(role.workers), "--bind", bind, *extra]
    if role.role == "server":
        argv = ["-m", "ps.server", "--scheduler", role.scheduler]
        argv += ["--shard", str(role.rank)] if role.rank is not None else []
        if env.get("PS_BIND"):
            argv += ["--bind", env["PS_BIND"]]
        elif local:
            argv += ["--bind", "tcp://127.0.0.1:*"]
        else:
            own = env.get("PS_PORT", str(DEFAULT_SERVER_PORT))
            argv += ["--bind", f"tcp://*:{own}", "--advertise",
                     f"tcp://{env.get('PS_ADVERTISE') or socket.gethostname()}:{own}"]
        return argv + extra
    argv = ["-m", "worker", "--scheduler", role.scheduler]
    argv += ["--id", str(role.rank)] if role.rank is not None else []
    argv += ["--job", env["PS_JOB"]] if env.get("PS_JOB") and "--job" not in extra else []
    return argv + extra


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    try:
        role = resolve(os.environ)
    except ContractError as exc:
        print(f"python -m ps: {exc}", file=sys.stderr)
        return 2
    args = command(role, os.environ, argv)
    os.execv(sys.executable, [sys.executable, *args])   # the role itself, in this process


if __name__ == "__main__":
    sys.exit(main())
