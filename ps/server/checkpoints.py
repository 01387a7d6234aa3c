"""A server's part of coordinated checkpoints (BSP, ``--checkpoint-every K``).

At every version that is a multiple of K the shard snapshots its parameters and optimizer
state and writes them off the event loop (``ps.reliability.checkpoint.ShardWriter``), so the
heartbeats go on however large the shard; the next heartbeat reports the file, and the
scheduler commits the manifest once every shard has written the same version. A failed
write (a full disk) is logged and counted; training goes on with the previous checkpoint.
"""
from __future__ import annotations

import errno
import logging
from collections import Counter

from ps.reliability import checkpoint

log = logging.getLogger("ps.server")


class Checkpoints:
    def __init__(self, every: int, folder: str, index: int, lo: int, hi: int, errors: Counter,
                 fail: bool = False, crash_at: str | None = None):
        self.every, self.index, self.errors = every, index, errors
        self.fail, self.crash_at = fail, crash_at         # fault hooks: a full disk, a crash
        self.writer = checkpoint.ShardWriter(folder, index, lo, hi)
        self.last: dict | None = None                      # what this shard last wrote

    def busy(self) -> bool:
        return self.writer.busy()

    def after_update(self, shard, version_before: int, tables=None) -> None:
        """After an update may have happened: a checkpoint when one is due. The sparse
        tables (``tables``) are at the same version then: a worker's sparse pushes are
        acknowledged before its dense push, and no step's sparse push can come before
        every dense shard has the version it starts from."""
        if shard.mode == "bsp" and shard.version != version_before and shard.version % self.every == 0:
            self.write(shard, tables)

    def write(self, shard, tables=None) -> None:
        """A snapshot of the shard at its version, written off the event loop."""
        version = shard.version
        if self.fail:                                       # fault hook: a full disk
            return self._failed(version, OSError(errno.ENOSPC, "no space left on device (injected)"))
        if self.writer.busy():            # before any copy: one write at a time
            log.warning("shard %d: checkpoint of version %d skipped, the previous one is still "
                        "being written", self.index, version)
            return
        crash = self.crash_at == f"checkpoint@{version}"                  # fault hook
        self.writer.start(version, shard.params.copy(), shard.optimizer.state(),
                          crash_before_rename=crash,   # copies: training goes on
                          tables=tables.snapshot() if tables else None)

    def collect(self, wait_s: float = 0.0) -> bool:
        """A finished write, if any: True when it is a new report for the next heartbeat."""
        outcome = self.writer.done(wait_s)
        if outcome is None:
            return False
        version, report, error = outcome
        if error is not None:
            self._failed(version, error)
            return False
        self.last = report
        return True

    def _failed(self, version: int, error: Exception) -> None:
        self.errors["checkpoint_failed"] += 1
        log.error("shard %d could not write its checkpoint of version %d: %s; training goes on",
                  self.index, version, error)
