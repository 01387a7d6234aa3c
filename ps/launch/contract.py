"""One environment contract for every launcher: which role a process is, its rank, and
where the scheduler is (``python -m ps`` reads it and becomes that role).

A cluster manager starts the same command everywhere and tells each process who it is
through its environment. Ours:

    PS_ROLE        scheduler, server or worker
    PS_RANK        the server's shard or the worker's id (default: the scheduler assigns one)
    PS_SCHEDULER   the scheduler's address, tcp://HOST:PORT (the scheduler binds its port)
    PS_SERVERS     S, PS_WORKERS M: the scheduler's counts

and, as aliases, what other managers already set:

    SLURM_PROCID                       the rank (srun: a task's index within its step)
    TF_CONFIG                          {"cluster": {"chief": ["h:p"], "ps": [...], "worker": [...]},
                                        "task": {"type": "chief"|"ps"|"worker", "index": i}}:
                                       the role (chief is the scheduler, ps a server), the
                                       rank, the scheduler's address and both counts
    DMLC_ROLE, DMLC_PS_ROOT_URI,       ps-lite's: the role, the scheduler's host and port,
    DMLC_PS_ROOT_PORT, DMLC_NUM_SERVER, the counts
    DMLC_NUM_WORKER

Every source that names a setting must agree with the others: a process told it is a
server by PS_ROLE and a worker by DMLC_ROLE refuses to start, naming both
(``ContractError``). Pure: ``resolve(env)`` reads a mapping and returns a ``Role``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

ROLES = ("scheduler", "server", "worker")
TF_TYPES = {"chief": "scheduler", "ps": "server", "worker": "worker"}


class ContractError(ValueError):
    """The environment does not say who this process is, or says it twice differently."""


@dataclass
class Role:
    role: str
    rank: int | None
    scheduler: str
    servers: int | None = None
    workers: int | None = None
    sources: dict = field(default_factory=dict)    # setting -> the variables that set it


def _int(name: str, text: str, low: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ContractError(f"{name}={text!r} is not an integer") from None
    if value < low:
        raise ContractError(f"{name}={value} must be >= {low}")
    return value


def _address(name: str, text: str) -> str:
    address = text if text.startswith("tcp://") else f"tcp://{text}"
    host, _, port = address[len("tcp://"):].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ContractError(f"{name}={text!r} is not HOST:PORT (or tcp://HOST:PORT)")
    return address


def _votes(env) -> dict[str, list[tuple[object, str]]]:
    """Every (value, source) each variable present gives for each setting."""
    votes: dict[str, list[tuple[object, str]]] = {k: [] for k in
                                                   ("role", "rank", "scheduler", "servers", "workers")}

    def vote(setting, value, source):
        votes[setting].append((value, source))

    if "PS_ROLE" in env:
        vote("role", env["PS_ROLE"], "PS_ROLE")
    if "PS_RANK" in env:
        vote("rank", _int("PS_RANK", env["PS_RANK"], 0), "PS_RANK")
    if "PS_SCHEDULER" in env:
        vote("scheduler", _address("PS_SCHEDULER", env["PS_SCHEDULER"]), "PS_SCHEDULER")
    for var, setting in (("PS_SERVERS", "servers"), ("PS_WORKERS", "workers")):
        if var in env:
            vote(setting, _int(var, env[var], 1), var)
    if "SLURM_PROCID" in env:
        vote("rank", _int("SLURM_PROCID", env["SLURM_PROCID"], 0), "SLURM_PROCID")
    if "TF_CONFIG" in env:
        try:
            tf = json.loads(env["TF_CONFIG"])
            cluster, task = tf["cluster"], tf["task"]
            kind, index = task["type"], task["index"]
        except (ValueError, TypeError, KeyError) as exc:
            raise ContractError(f"TF_CONFIG is not {{cluster, task: {{type, index}}}}: {exc}") from None
        if kind not in TF_TYPES:
            raise ContractError(f"TF_CONFIG task type {kind!r} is not one of {sorted(TF_TYPES)}")
        vote("role", TF_TYPES[kind], "TF_CONFIG")
        if kind != "chief":
            vote("rank", _int("TF_CONFIG task index", index, 0), "TF_CONFIG")
        if cluster.get("chief"):
            vote("scheduler", _address("TF_CONFIG chief", cluster["chief"][0]), "TF_CONFIG")
        for key, setting in (("ps", "servers"), ("worker", "workers")):
            if key in cluster:
                vote(setting, len(cluster[key]), "TF_CONFIG")
    if "DMLC_ROLE" in env:
        vote("role", env["DMLC_ROLE"], "DMLC_ROLE")
    if "DMLC_PS_ROOT_URI" in env or "DMLC_PS_ROOT_PORT" in env:
        uri, port = env.get("DMLC_PS_ROOT_URI", ""), env.get("DMLC_PS_ROOT_PORT", "")
        vote("scheduler", _address("DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT", f"{uri}:{port}"),
             "DMLC_PS_ROOT_URI/PORT")
    for var, setting in (("DMLC_NUM_SERVER", "servers"), ("DMLC_NUM_WORKER", "workers")):
        if var in env:
            vote(setting, _int(var, env[var], 1), var)
    return votes


def resolve(env) -> Role:
    """The role ``env`` (a mapping, os.environ) describes; ContractError if it describes
    none, an incomplete one, or several."""
    votes = _votes(env)
    chosen, sources = {}, {}
    for setting, said in votes.items():
        values = {v for v, _ in said}
        if len(values) > 1:
            raise ContractError(f"conflicting {setting}: " + ", ".join(
                f"{source} says {value}" for value, source in said))
        chosen[setting] = next(iter(values)) if values else None
        sources[setting] = [source for _, source in said]
    if chosen["role"] is None:
        raise ContractError("no role: set PS_ROLE (scheduler, server or worker), or TF_CONFIG, "
                            "or DMLC_ROLE")
    if chosen["role"] not in ROLES:
        raise ContractError(f"role {chosen['role']!r} is not one of {', '.join(ROLES)}")
    if chosen["scheduler"] is None:
        raise ContractError("no scheduler address: set PS_SCHEDULER=tcp://HOST:PORT (or "
                            "TF_CONFIG's chief, or DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT)")
    if chosen["role"] == "scheduler" and (chosen["servers"] is None or chosen["workers"] is None):
        raise ContractError("the scheduler needs the counts: PS_SERVERS and PS_WORKERS (or "
                            "TF_CONFIG's cluster, or DMLC_NUM_SERVER and DMLC_NUM_WORKER)")
    return Role(chosen["role"], chosen["rank"], chosen["scheduler"], chosen["servers"],
                chosen["workers"], sources)
