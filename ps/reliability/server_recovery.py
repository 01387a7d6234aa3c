"""Recovery from a lost server: the scheduler's half of coordinated checkpoints.

Servers write their shard of a version and report it in their heartbeats' stats;
``Recovery.commit`` writes the manifest (the commit point, ``ps.reliability.checkpoint``) once
every shard has reported the same version. With ``--resume``, ``Recovery.resume``
picks the newest intact checkpoint when the cluster forms and counts the steps
before it as done. The scheduler owns one ``Recovery`` and calls both; the
invariant it keeps: ``committed`` only grows, and names a version every shard holds.
"""
from __future__ import annotations

import logging

from ps.core.tasks import TaskPlan
from ps.reliability import checkpoint
from ps.scheduler.runstate import RunState
from ps.trace import Tracer

log = logging.getLogger("ps.scheduler")


class Recovery:
    def __init__(self, directory: str | None, servers: int, tracer: Tracer, journal=None):
        self.directory = directory
        self.journal = journal                   # commits are journaled (a restart knows them)
        self.servers = servers
        self.tracer = tracer
        self.committed = 0                       # newest checkpoint version with a manifest
        self.failed_version = 0                  # newest version whose manifest could not be written
        self.resumed_from: dict | None = None    # for the summary: version and skipped checkpoints

    def resume(self, total: int, plan: TaskPlan, run: RunState) -> tuple[dict | None, int]:
        """The newest intact checkpoint and the step to go on from. The steps before it
        are complete on every shard (BSP version = steps applied), so their samples
        count as applied."""
        manifest, skipped = checkpoint.latest_intact(self.directory)
        for reason in skipped:
            log.warning("checkpoint skipped: %s", reason)
        if manifest is None:
            log.warning("no intact checkpoint in %s: starting from step 0", self.directory)
            return None, 0
        if manifest["shards"][-1]["hi"] != total:
            raise ValueError(f"checkpoint holds {manifest['shards'][-1]['hi']} parameters, "
                             f"the model has {total}")
        start = manifest["version"]
        spe = plan.steps_per_epoch
        for step in range(start):
            for task in plan.tasks(step):
                run.count_task(task.id, step // spe, len(task.samples), rejected=False)
        for step, loss in enumerate(manifest.get("losses", [])[:start]):
            run.loss_sum[step], run.loss_samples[step] = loss, 1
        self.committed = start
        self.resumed_from = {"version": start, "skipped": skipped}
        log.warning("resuming from the checkpoint of version %d", start)
        return manifest, start

    def commit(self, shard_stats: dict[int, dict], run: RunState) -> None:
        """Once every shard has written the same version, write the manifest (the commit)."""
        reports = [st.get("checkpoint") for st in shard_stats.values()]
        if len(reports) < self.servers or not all(reports):
            return
        versions = {r["version"] for r in reports}
        version = min(versions)
        if len(versions) != 1 or version <= max(self.committed, self.failed_version):
            return
        losses = run.losses() if len(run.loss_samples) >= version else []
        try:
            checkpoint.write_manifest(self.directory, version, reports,
                                      {"servers": self.servers, "losses": losses[:version]})
        except OSError as exc:       # a full disk: the previous checkpoint stays the latest
            self.failed_version = version   # (not tried again on every heartbeat)
            log.error("could not commit the checkpoint of version %d: %s; training goes on",
                      version, exc)
            return
        self.committed = version
        if self.journal is not None:
            self.journal.commit(version)
        self.tracer.instant("checkpoint", "fault", version=version)
        log.info("checkpoint of version %d committed", version)
