"""Coordinated checkpoints: every shard at the same version, a manifest as commit point.

Layout under a checkpoint directory::

    v000040/shard-0.npz      shard 0's parameters and optimizer state at version 40
    v000040/shard-1.npz
    manifest-v000040.json    written last: names every shard file, its flat range and sha256

A shard writes its file to a temporary name, fsyncs it and renames it: a file that
exists is complete. The scheduler writes the manifest (the same way) only once
every shard has reported its file for that version, so a checkpoint without a
manifest, or one interrupted while writing, is never used. Loading checks every
file's sha256 and falls back to an older manifest when one does not match
(a corrupted or truncated file). Files are cut by flat range, so a run can resume
with a different number of servers: each new shard reads the slices of the old
files that overlap its range.

Plain numpy and files; the server writes (on a thread of its own, ``ShardWriter``), the
scheduler commits and chooses.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import threading

import numpy as np

KEEP = 2                         # manifests kept: the newest and one to fall back to


def _fsync_replace(tmp: str, path: str) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)           # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_file(version: int, shard: int) -> str:
    """Where a shard's state at ``version`` lives, relative to the checkpoint directory."""
    return os.path.join(f"v{version:06d}", f"shard-{shard}.npz")


def write_shard(root: str, version: int, shard: int, lo: int, hi: int,
                params: np.ndarray, optimizer_state: dict, crash_before_rename: bool = False,
                tables: dict | None = None) -> dict:
    """Write one shard's state at ``version``; return what the manifest needs.
    ``crash_before_rename``: a fault hook, SIGKILL once the temporary file is written.
    ``tables``: the server's sparse tables' arrays (``sparse.<table>.<array>``), kept
    in the same file."""
    path = os.path.join(root, shard_file(version, shard))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    arrays = {f"opt_{k}": np.asarray(v) for k, v in optimizer_state.items()}
    arrays.update(tables or {})
    with open(tmp, "wb") as f:
        np.savez(f, params=params, lo=lo, hi=hi, version=version, **arrays)
    if crash_before_rename:
        os.kill(os.getpid(), signal.SIGKILL)
    _fsync_replace(tmp, path)
    return {"shard": shard, "file": shard_file(version, shard), "lo": lo, "hi": hi,
            "sha256": sha256(path)}


class ShardWriter:
    """Writes one shard's checkpoints on a thread of its own.

    A write is several passes over the shard's state (``np.savez``, fsync, sha256: 1.6 s
    for 25M floats with Adam on the README's machine). Done in the server's event loop
    it would silence the server's heartbeats for that long, and past ``--dead-after-s``
    the scheduler would declare the server dead. So the server hands the writer a
    snapshot (copies: training goes on meanwhile) and collects the outcome with
    ``done`` between messages. One write at a time: a checkpoint that falls due while the
    previous one is still being written is skipped (no manifest is committed for a
    version some shard skipped; the next one is).
    """

    def __init__(self, root: str, shard: int, lo: int, hi: int):
        self.root, self.shard, self.lo, self.hi = root, shard, lo, hi
        self._thread: threading.Thread | None = None
        self._outcome: tuple | None = None     # (version, report or None, error or None)

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, version: int, params: np.ndarray, optimizer_state: dict,
              crash_before_rename: bool = False, tables: dict | None = None) -> bool:
        """Write ``params`` and ``optimizer_state`` (snapshots nobody else writes) as
        ``version`` in the background; False, and nothing started, if a write is in
        progress."""
        if self.busy():
            return False

        def write() -> None:
            try:
                report = write_shard(self.root, version, self.shard, self.lo, self.hi, params,
                                     optimizer_state, crash_before_rename, tables)
                self._outcome = (version, dict(report, version=version), None)
            except Exception as exc:       # a full disk, or a bug: reported, not raised here
                self._outcome = (version, None, exc)

        self._outcome = None
        self._thread = threading.Thread(target=write, name=f"checkpoint-v{version}", daemon=True)
        self._thread.start()
        return True

    def done(self, wait_s: float = 0.0) -> tuple | None:
        """The finished write's ``(version, report, error)`` (``report`` is what the
        manifest needs, with its version), once; None while it is still being written
        (after waiting up to ``wait_s``) or when nothing was started."""
        if self._thread is None:
            return None
        self._thread.join(wait_s)
        if self._thread.is_alive():
            return None
        self._thread, outcome = None, self._outcome
        return outcome


def write_manifest(root: str, version: int, shards: list[dict], extra: dict) -> str:
    """The commit point: after this, version ``version`` is a checkpoint. Then only the
    newest ``KEEP`` checkpoints stay, and the shard files of older versions that were
    never committed (a shard crashed, skipped or reported late) go: versions are
    committed in increasing order, so none of them ever will be."""
    path = os.path.join(root, f"manifest-v{version:06d}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"version": version, "shards": sorted(shards, key=lambda s: s["lo"]), **extra}, f)
    _fsync_replace(tmp, path)
    manifests = sorted(glob.glob(os.path.join(root, "manifest-v*.json")))
    for old in manifests[:-KEEP]:
        os.remove(old)
    kept = {os.path.basename(p)[len("manifest-"):-len(".json")] for p in manifests[-KEEP:]}
    for folder in glob.glob(os.path.join(root, "v[0-9]*")):
        name = os.path.basename(folder)                  # "v000040"
        if name not in kept and name[1:].isdigit() and int(name[1:]) < version:
            _remove_folder(folder)
    return path


def _remove_folder(folder: str) -> None:
    for path in glob.glob(os.path.join(folder, "*")):
        os.remove(path)
    os.rmdir(folder)


def latest_intact(root: str) -> tuple[dict | None, list[str]]:
    """The newest manifest whose files all exist with the right sha256, and why each
    newer one was skipped."""
    skipped = []
    for path in sorted(glob.glob(os.path.join(root, "manifest-v*.json")), reverse=True):
        try:
            with open(path) as f:
                manifest = json.load(f)
            for s in manifest["shards"]:
                if sha256(os.path.join(root, s["file"])) != s["sha256"]:
                    raise ValueError(f"{s['file']} does not match its sha256")
            manifest["root"] = root
            return manifest, skipped
        except (OSError, ValueError, KeyError, TypeError) as exc:   # damaged in any way
            skipped.append(f"{os.path.basename(path)}: {exc}")
    return None, skipped


def load_sparse(manifest: dict, table: str) -> list[dict]:
    """Every shard file's snapshot of sparse table ``table`` (``ps.sparse.SparseTable
    .snapshot``): one dict of arrays per old server."""
    parts = []
    for s in manifest["shards"]:
        with np.load(os.path.join(manifest["root"], s["file"])) as npz:
            prefix = f"sparse.{table}."
            arrays = {k[len(prefix):]: npz[k] for k in npz.files if k.startswith(prefix)}
        if not arrays:
            raise ValueError(f"checkpoint {s['file']} has no sparse table {table!r}")
        parts.append(arrays)
    return parts


def load_range(manifest: dict, lo: int, hi: int) -> tuple[np.ndarray, dict]:
    """Parameters and optimizer state of the flat range [lo, hi), from whichever shard
    files cover it (the old shards may have been cut differently)."""
    params = np.empty(hi - lo, dtype=np.float32)
    state: dict = {}
    for s in manifest["shards"]:
        a, b = max(lo, s["lo"]), min(hi, s["hi"])
        if a >= b:
            continue
        with np.load(os.path.join(manifest["root"], s["file"])) as npz:
            params[a - lo:b - lo] = npz["params"][a - s["lo"]:b - s["lo"]]
            for key in npz.files:
                if not key.startswith("opt_"):        # (sparse.*: a table's, load_sparse)
                    continue
                value = npz[key]
                name = key[len("opt_"):]
                if value.ndim == 0:                      # a scalar such as the step count
                    state[name] = value.item()
                else:
                    state.setdefault(name, np.empty(hi - lo, dtype=value.dtype))
                    state[name][a - lo:b - lo] = value[a - s["lo"]:b - s["lo"]]
    return params, state
