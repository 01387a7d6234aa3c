"""The scheduler's journal: an append-only file of what it must remember across a restart.

With ``--journal PATH`` the scheduler appends one record for each decision a restarted
scheduler needs to go on with the same run: the run's configuration (its fingerprint),
the cluster it formed (the shard map, the job, every member and its incarnation), each
round of tasks it dealt, each REPORT it took (task ids, losses, timings), tasks it
counted as applied without a report, deaths and replacements, checkpoint commits and
the phases of the end of the run. ``ps.reliability.scheduler_restart`` reads the records back into the
scheduler's state when it starts again on the same endpoint.

The file format, one record after another::

    [u32 length][u32 crc32 of the body][body: a msgpack map with "t", the record's type]

msgpack only, never pickle: a journal is data, not code. A SIGKILL loses nothing that
was written (the bytes are in the kernel's page cache), so every record is written at
once; ``fsync`` is for a machine that loses power, and is paid only where a lost record
would break a promise: the configuration, the formation and every incarnation handed
out (a restarted scheduler must never give one out twice), deaths (a fenced process
stays fenced), checkpoint commits and phase changes. A report lost that way is
recovered like a lost REPORT message: its tasks are dealt again and the shards refuse
them as duplicates. A torn last record (the process died inside a write) fails its
length or checksum; it and anything after it are dropped, and the file is cut back to
the last whole record before new ones are appended.
"""
from __future__ import annotations

import logging
import os
import struct
import time
import zlib

import msgpack

log = logging.getLogger("ps.scheduler")

HEADER = struct.Struct("<II")     # body length, crc32 of the body
MAX_RECORD_BYTES = 1 << 24        # a record is a few hundred bytes; a larger length is damage


def read(path: str) -> tuple[list[dict], int]:
    """The whole records of the journal at ``path`` and the offset where they end
    (a torn or damaged tail is not part of it). A missing file has no records."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return [], 0
    records, offset = [], 0
    while offset + HEADER.size <= len(data):
        length, crc = HEADER.unpack_from(data, offset)
        body = data[offset + HEADER.size:offset + HEADER.size + length]
        if length > MAX_RECORD_BYTES or len(body) < length or zlib.crc32(body) != crc:
            break
        try:
            record = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception:          # a checksum collision on garbage: stop like a torn record
            break
        if not isinstance(record, dict) or "t" not in record:
            break
        records.append(record)
        offset += HEADER.size + length
    if offset < len(data):
        log.warning("journal %s: %d bytes after the last whole record dropped (a torn write)",
                    path, len(data) - offset)
    return records, offset


class Journal:
    """Appends records to ``path``; without a path it is a journal that writes nothing,
    so the scheduler calls it the same way with and without ``--journal``."""

    def __init__(self, path: str | None):
        self.path = path
        self.records: list[dict] = []        # what was there when we started (to replay)
        self.file = None
        if path:
            self.records, end = read(path)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "ab")
            self.file.truncate(end)           # cut a torn tail before appending after it
            self.file.seek(end)

    def append(self, t: str, sync: bool = False, **fields) -> None:
        """Write one record now; with ``sync``, also to the disk before returning."""
        if self.file is None:
            return
        body = msgpack.packb({"t": t, **fields}, use_bin_type=True)
        self.file.write(HEADER.pack(len(body), zlib.crc32(body)) + body)
        self.file.flush()                      # into the page cache: survives a SIGKILL
        if sync:
            os.fsync(self.file.fileno())       # onto the disk: survives a power loss

    # -- the records (one verb each; ps.reliability.scheduler_restart reads them back) ----
    def config(self, fingerprint: dict) -> None:
        self.append("config", sync=True, config=fingerprint, wall=time.time(), t0=time.monotonic())

    def formed(self, **fields) -> None:
        """The cluster formed: written (and on disk) before any member hears its incarnation."""
        self.append("formed", sync=True, **fields)

    def member(self, role: str, index: int, inc: int, rejoin: dict | None = None) -> None:
        """An incarnation handed out mid-run (a replacement): on disk before the reply."""
        self.append("member", sync=True, role=role, index=index, inc=inc, rejoin=rejoin)

    def death(self, role: str, index: int, inc: int, death: dict) -> None:
        self.append("dead", sync=True, role=role, index=index, inc=inc, death=death)

    def dealt(self, rnd: int, tasks: int) -> None:
        """Round ``rnd`` was dealt, each step cut into ``tasks`` tasks. Synced: with the
        adaptive grain a task id names different samples in a step cut differently, so a
        restarted scheduler must deal the round as it was dealt (one fsync a round)."""
        self.append("dealt", sync=True, round=rnd, tasks=tasks)

    def report(self, header: dict) -> None:
        self.append("report", **{k: header[k] for k in REPORT_FIELDS})

    def applied(self, ids: list[int]) -> None:
        """Tasks counted as applied without a report (their step is complete on every shard)."""
        if ids:
            self.append("applied", ids=ids)

    def started(self, at: float) -> None:
        self.append("started", at=at)

    def commit(self, version: int) -> None:
        self.append("commit", sync=True, version=version)

    def phase(self, phase: str, **fields) -> None:
        self.append("phase", sync=True, phase=phase, **fields)

    def restarted(self, record: dict) -> None:
        self.append("restart", sync=True, **record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


REPORT_FIELDS = ("worker", "inc", "rid", "step", "tasks", "rejected", "loss_sum", "samples",
                 "compute_s", "wait_s")


def fingerprint(config) -> dict:
    """What must be the same for a restarted scheduler to go on with a run: a journal of
    another run (other flags) is refused rather than replayed into this one."""
    return {k: getattr(config, k) for k in ("servers", "workers", "mode", "staleness", "steps",
                                            "epochs", "seed", "tasks_per_step", "steal",
                                            "checkpoint_every")}


def next_incarnation(records: list[dict]) -> int:
    """The first incarnation a restarted scheduler may hand out: above every one in the
    journal (each was on disk before anyone heard of it)."""
    incs = [r["inc"] for r in records if r["t"] in ("member", "dead")]
    incs += [m[2] for r in records if r["t"] == "formed" for m in r["members"]]
    return max(incs, default=0) + 1
