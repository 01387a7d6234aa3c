"""Registration: the checks a REGISTER must pass and the index the role gets.

The scheduler's ``on_register`` calls these while the cluster forms, and again when
a replacement worker joins mid-run. Pure functions over request headers: a request
that fails a check raises ``ProtocolError`` (the scheduler answers it with ERROR and
goes on). The invariant they keep: every worker of a run describes the same job
(model layout, data set, batch size, optimizer, epochs) with the scheduler's seed,
and no index is held by two live roles.
"""
from __future__ import annotations

from .optim import make_optimizer
from .protocol import Error, ProtocolError

JOB_FIELDS = ("layout", "dataset_size", "batch_size", "shuffle", "optimizer", "epochs")


def pick_index(wanted, taken: dict, count: int, what: str) -> int:
    """The index a role asked for (launchers pin them), else the lowest free one."""
    if not (isinstance(wanted, int) and not isinstance(wanted, bool)) or wanted < 0:
        wanted = next((i for i in range(count) if i not in taken), count)
    if wanted >= count or wanted in taken:
        raise ProtocolError(Error.BAD_FIELD, f"{what} {wanted} is taken or out of range [0, {count})")
    return wanted


def admit(header: dict, servers: dict, workers: dict, cfg) -> int:
    """A REGISTER while the cluster forms: check it, record the role in ``servers`` (its
    endpoint) or ``workers`` (its job), and return the index it gets."""
    if header["role"] == "server":
        index = pick_index(header.get("shard"), servers, cfg.servers, "shard")
        if not isinstance(header.get("endpoint"), str):
            raise ProtocolError(Error.MISSING_FIELD, "a server registers its endpoint")
        servers[index] = {"endpoint": header["endpoint"]}
    elif header["role"] == "worker":
        index = pick_index(header.get("worker"), workers, cfg.workers, "worker")
        workers[index] = worker_job(header, cfg.seed, workers.values())
    else:
        raise ProtocolError(Error.BAD_FIELD, f"unknown role {header['role']!r}")
    return index


def job_of(header: dict) -> dict:
    """The job a worker describes when it registers: what every worker must agree on."""
    return {k: header.get(k) for k in JOB_FIELDS}


def worker_job(header: dict, seed: int, others) -> dict:
    """Check a forming worker's job (fields, optimizer, seed, agreement with the workers
    already registered) and return it."""
    info = job_of(header)
    if not (isinstance(info["layout"], list) and isinstance(info["dataset_size"], int)
            and isinstance(info["batch_size"], int) and isinstance(info["optimizer"], dict)):
        raise ProtocolError(Error.MISSING_FIELD, "a worker registers its layout, dataset_size, "
                                                 "batch_size and optimizer")
    try:
        make_optimizer(info["optimizer"], 1)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(Error.BAD_FIELD, f"optimizer {info['optimizer']}: {exc}") from None
    if header.get("seed") != seed:
        raise ProtocolError(Error.BAD_FIELD, f"worker seed {header.get('seed')!r} differs from "
                                             f"the scheduler's {seed}")
    for other in others:
        if other != info:
            raise ProtocolError(Error.BAD_FIELD, "this worker's job differs from the others' "
                                                 "(model layout, data set or optimizer)")
    return info


def pick_replacement(wanted, dead: list[int]) -> int:
    """The dead worker id a replacement takes: the one it asked for, else the lowest."""
    index = wanted if wanted in dead else (dead[0] if dead and wanted in (None, -1) else None)
    if index is None:
        # The worker it replaces may not have been declared dead yet: ask it to retry.
        raise ProtocolError(Error.NOT_READY, f"no dead worker to replace (asked for {wanted!r})")
    return index
