"""What a blocked pull is waiting for, named in one log line (no silent hangs).

A worker whose BSP pull for step t has waited longer than a few heartbeats
(``ps.wire.protocol.WAIT_LOG_S``) asks each shard for its counters (a shard answers STATS
at once, even while it holds the pull back) and the scheduler who holds the tasks the
slowest shard is missing, and logs it::

    step 12 pull waiting on server1 (shard 1 at version 11: missing tasks 46 leased to
    worker 2, 47 queued for worker 2)

The same text goes into the error the worker exits with if the pull's deadline passes.
"""
from __future__ import annotations

from ps.scheduler.diagnose import describe
from ps.wire.client import Peer, RemoteError, ShardClient
from ps.wire.protocol import Kind

ASK_TIMEOUT_S = 1.0     # a shard or scheduler that cannot answer STATS in this long is named as such


def describe_pull(shards: ShardClient, scheduler: Peer, step: int, mode: str) -> str:
    stats = shards.stats(ASK_TIMEOUT_S)          # every shard asked at once
    behind = {k: st for k, st in stats.items() if "error" in st or mode != "bsp"
              or st.get("version", step) < step}
    versions = [st["version"] for st in behind.values() if "version" in st]
    missing = []
    if mode == "bsp" and versions:
        try:
            missing = scheduler.request(Kind.STATUS, ASK_TIMEOUT_S, step=min(versions))[0].get("missing", [])
        except (TimeoutError, RemoteError):
            pass
    parts = []
    for k, st in sorted(behind.items()):
        if "error" in st:
            parts.append(f"server{k} (not answering: {st['error']})")
        elif mode != "bsp":
            parts.append(f"server{k} (shard {k}: clocks {st.get('clocks')})")
        else:
            has = set(st.get("step_tasks", []))
            here = [m for m in missing if m[0] not in has and st["version"] == min(versions)]
            parts.append(f"server{k} (shard {k} at version {st['version']}: "
                         + (f"missing tasks {describe(here)}" if here else
                            f"has tasks {sorted(has)} of step {st['version']}") + ")")
    return f"step {step} pull waiting on " + (", ".join(parts) or "no shard (answered since)")
