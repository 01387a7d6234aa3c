"""Registration: the checks a REGISTER must pass and the index the role gets.

``ps.scheduler.forming`` calls these while the cluster forms, and again when a replacement
worker joins mid-run; the scheduler checks each server heartbeat's counters with
``server_stats``, and a worker heartbeat's message-fault counters with ``net_faults``.
Pure functions over request headers: a request that fails a check raises
``ProtocolError`` (the scheduler answers it with ERROR and goes on). The
invariants they keep: every worker of a run describes the same job (model layout, data
set, batch size, optimizer, epochs) with the scheduler's seed, and no index is held by
two live roles; what the scheduler computes with is what an honest member sends.
"""
from __future__ import annotations

import re
from math import prod

from ps.core.optim import make_optimizer
from ps.faults import messages
from ps.reliability.checkpoint import shard_file
from ps.sparse import check_spec
from ps.wire.protocol import Error, ProtocolError, is_int, optional_int

JOB_FIELDS = ("layout", "dataset_size", "batch_size", "shuffle", "optimizer", "epochs",
              "param_groups", "lr_at", "clip", "outer_optimizer", "sparse")
STATS_COUNTS = ("version", "max_staleness", "duplicates_rejected", "fenced_rejected")
SHA256 = re.compile(r"[0-9a-f]{64}")


def outer_optimizer(cfg, outer: dict) -> dict:
    """The servers' optimizer in DiLoCo: the job's OUTER_OPTIMIZER; async, SGD becomes
    ``delayed_sgd``, its momentum applied once every ``--momentum-every`` pushes (default
    M: a round's worth, ``ps.core.optim.DelayedSGD``). Other optimizers step per push."""
    if not (getattr(cfg, "diloco_async", False) and isinstance(outer, dict)
            and str(outer.get("name", "")).lower() == "sgd"):
        return outer
    if outer.get("dampening", 0) or outer.get("weight_decay", 0) or outer.get("maximize"):
        raise ValueError("async DiLoCo delays SGD's momentum and has no dampening, "
                         "weight_decay or maximize: leave them out of OUTER_OPTIMIZER")
    unknown = sorted(set(outer) - {"name", "lr", "momentum", "nesterov", "dampening",
                                   "weight_decay", "maximize"})
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for sgd")
    return {"name": "delayed_sgd", "lr": outer.get("lr"), "momentum": outer.get("momentum", 0.0),
            "nesterov": outer.get("nesterov", False),
            "every": cfg.momentum_every or cfg.workers}


def pick_index(wanted, taken: dict, count: int, what: str) -> int:
    """The index a role asked for (launchers pin them), else the lowest free one."""
    if not _count(wanted):
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
        workers[index] = worker_job(header, cfg, workers.values())
    else:
        raise ProtocolError(Error.BAD_FIELD, f"unknown role {header['role']!r}")
    return index


def job_of(header: dict) -> dict:
    """The job a worker describes when it registers: what every worker must agree on."""
    return {k: header.get(k) for k in JOB_FIELDS}


def worker_job(header: dict, cfg, others) -> dict:
    """Check a forming worker's job (fields, layout, optimizer, seed, agreement with the
    workers already registered) and return it. Checked here, so that what forming does
    with the job (cut the layout, count the steps) cannot fail later on a bad one, with
    every other member's registration held."""
    info, seed = job_of(header), cfg.seed
    if not (isinstance(info["layout"], list) and is_int(info["dataset_size"])
            and is_int(info["batch_size"]) and isinstance(info["optimizer"], dict)):
        raise ProtocolError(Error.MISSING_FIELD, "a worker registers its layout, dataset_size, "
                                                 "batch_size and optimizer")
    if not (info["dataset_size"] > 0 and info["batch_size"] > 0 and isinstance(info["shuffle"], bool)
            and (info["epochs"] is None or is_int(info["epochs"]) and info["epochs"] > 0)):
        raise ProtocolError(Error.BAD_FIELD, "dataset_size and batch_size must be positive ints, "
                                             "shuffle a bool, epochs a positive int or nil")
    size = layout_size(info["layout"])
    if size < cfg.servers:
        raise ProtocolError(Error.BAD_FIELD, f"a model of {size} parameters cannot be cut into "
                                             f"{cfg.servers} shards")
    for field in ("optimizer", "outer_optimizer"):      # outer: DiLoCo's, on the servers
        if field == "outer_optimizer" and info[field] is None:
            continue
        try:
            make_optimizer(info[field] if field == "optimizer" else
                           outer_optimizer(cfg, info[field]), 1)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(Error.BAD_FIELD, f"{field} {info[field]}: {exc}") from None
    param_groups(info["param_groups"], info["optimizer"], size)
    recipe(info)
    sparse_tables(info, cfg)
    if header.get("seed") != seed:
        raise ProtocolError(Error.BAD_FIELD, f"worker seed {header.get('seed')!r} differs from "
                                             f"the scheduler's {seed}")
    for other in others:
        if other != info:
            raise ProtocolError(Error.BAD_FIELD, "this worker's job differs from the others' "
                                                 "(model layout, data set or optimizer)")
    return info


def param_groups(groups, optimizer: dict, size: int) -> None:
    """Check a job's parameter groups: nil, or ``[[lo, hi, overrides], ...]`` ranges of the
    flat vector covering ``[0, size)`` in order, each overrides map valid for the optimizer
    (the servers build one optimizer per range they hold from it)."""
    if groups is None:
        return
    if not isinstance(groups, list) or not 0 < len(groups) <= size:
        raise ProtocolError(Error.BAD_FIELD, "param_groups must be nil or a non-empty list")
    at = 0
    for entry in groups:
        if not (isinstance(entry, list) and len(entry) == 3 and is_int(entry[0])
                and is_int(entry[1]) and entry[0] == at and entry[0] < entry[1] <= size
                and isinstance(entry[2], dict) and "name" not in entry[2]):
            raise ProtocolError(Error.BAD_FIELD, "param_groups must be [lo, hi, overrides] "
                                                 f"ranges covering [0, {size}) in order")
        try:
            make_optimizer({**optimizer, **entry[2]}, 1)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(Error.BAD_FIELD, f"param_groups {entry[2]}: {exc}") from None
        at = entry[1]
    if at != size:
        raise ProtocolError(Error.BAD_FIELD, f"param_groups cover [0, {at}), not [0, {size})")


def recipe(info: dict) -> None:
    """A job's schedule and clipping: ``lr_at`` says whether its workers will send a table
    of rates (a group's own lr is then scaled by ``rate / OPTIMIZER["lr"]``, so that lr
    must not be 0); ``clip`` is nil or the global norm's bound, a finite number > 0."""
    if info["lr_at"] is not None and not isinstance(info["lr_at"], bool):
        raise ProtocolError(Error.BAD_FIELD, "lr_at must be a bool or nil")
    clip = info["clip"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                             or not 0 < clip < float("inf")):
        raise ProtocolError(Error.BAD_FIELD, f"clip must be nil or a finite number > 0, not {clip!r}")
    own_lr = any("lr" in g[2] for g in info["param_groups"] or ())
    if info["lr_at"] and own_lr and make_optimizer(info["optimizer"], 1).lr == 0:
        raise ProtocolError(Error.BAD_FIELD, "a group with its own lr is scaled by "
                                             "lr_at(step) / OPTIMIZER['lr'], which is 0")


def sparse_tables(info: dict, cfg) -> None:
    """A job's sparse tables (``ps.sparse.check_spec``): nil or a list of distinct names;
    not in DiLoCo, for now."""
    tables = info["sparse"]
    if tables is None:
        return
    if not isinstance(tables, list) or not tables or len(tables) > 64:
        raise ProtocolError(Error.BAD_FIELD, "sparse must be nil or a list of 1-64 tables")
    try:
        specs = [check_spec(t) for t in tables]
    except ValueError as exc:
        raise ProtocolError(Error.BAD_FIELD, str(exc)) from None
    if len({s["name"] for s in specs}) != len(specs):
        raise ProtocolError(Error.BAD_FIELD, "two sparse tables share a name")
    if getattr(cfg, "mode", "bsp") == "diloco":
        raise ProtocolError(Error.BAD_FIELD, "sparse tables need --mode bsp, ssp or asp "
                                             "(DiLoCo with tables is not built yet)")


def layout_size(layout: list) -> int:
    """The parameters of a layout: ``[[name, shape], ...]`` in the model's order, each
    name a string and each shape a list of non-negative ints."""
    size = 0
    for entry in layout:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], list) and all(_count(d) for d in entry[1])):
            raise ProtocolError(Error.BAD_FIELD, "layout must be a list of [name, shape] pairs, "
                                                 "a shape a list of non-negative ints")
        size += prod(entry[1])
    return size


def pick_replacement(wanted, dead: list[int]) -> int:
    """The dead worker id a replacement takes: the one it asked for, else the lowest."""
    index = wanted if wanted in dead else (dead[0] if dead and wanted in (None, -1) else None)
    if index is None:
        # The worker it replaces may not have been declared dead yet: ask it to retry.
        raise ProtocolError(Error.NOT_READY, f"no dead worker to replace (asked for {wanted!r})")
    return index


def server_stats(stats, index: int, shard_map: list[dict] | None) -> dict:
    """A server's counters (its heartbeat, or its REGISTER after our restart), checked
    before they are kept: the scheduler computes with some of them (the version a dead
    worker's tasks are complete below, checkpoint commits, the summary's sums), so
    those must be what an honest server sends, and a checkpoint report must name this
    shard's own file and (once the cluster has formed: ``shard_map``) its range. The
    rest are only shown (msgpack already rules out binary data)."""
    own = [(s["lo"], s["hi"]) for s in shard_map or () if s["index"] == index]
    if not isinstance(stats, dict):
        raise ProtocolError(Error.BAD_FIELD, "a server's stats must be a map")
    for key in STATS_COUNTS:
        if key in stats and not _count(stats[key]):
            raise ProtocolError(Error.BAD_FIELD, f"stats.{key} must be a non-negative int")
    report = stats.get("checkpoint")
    if report is not None and not (
            isinstance(report, dict) and all(_count(report.get(k)) for k in ("lo", "hi", "version"))
            and report.get("shard") == index and report["lo"] < report["hi"]
            and (not own or (report["lo"], report["hi"]) == own[0])
            and report.get("file") == shard_file(report["version"], index)
            and isinstance(report.get("sha256"), str) and SHA256.fullmatch(report["sha256"])):
        raise ProtocolError(Error.BAD_FIELD, f"stats.checkpoint is not shard {index}'s report")
    if "net_faults" in stats:
        net_faults(stats["net_faults"])
    return stats


def net_faults(counts) -> dict:
    """A role's message-fault counters (``ps.faults.messages``, in a server's stats or a
    worker's heartbeat), which the summary adds up: each a non-negative int."""
    if not (isinstance(counts, dict) and set(counts) == set(messages.COUNTERS)
            and all(_count(v) for v in counts.values())):
        raise ProtocolError(Error.BAD_FIELD, f"net_faults must map {', '.join(messages.COUNTERS)} "
                                             "to non-negative ints")
    return counts


def bytes_moved(header: dict) -> tuple[int, int]:
    """A REPORT's or FINISHED's payload byte counters, (pushed, pulled): optional
    non-negative ints, the worker incarnation's totals so far (the summary's bytes)."""
    return (optional_int(header, "bytes_pushed", 0, 0, 1 << 62),
            optional_int(header, "bytes_pulled", 0, 0, 1 << 62))


def _count(value) -> bool:
    return is_int(value) and value >= 0
