"""Coordinated checkpoints (ps.reliability.checkpoint): layout, commit point, fallback and re-cutting.

What recovery relies on: a shard file appears only under its final name (temp file,
fsync, rename); a version is a checkpoint only once its manifest exists; loading takes
the newest manifest whose files all match their sha256 and says why newer ones were
skipped; only ``KEEP`` checkpoints stay on disk; and ``load_range`` gives back exactly
the bytes written, for any flat range, however the old shards were cut. Real files in
``tmp_path``, real numpy arrays; no processes. A server writes its checkpoints on a
thread (``ShardWriter``), so its event loop answers and heartbeats while a large shard
is written; one test drives a real server in-process to show it.
"""
import json
import os
import threading
import time

import numpy as np
import pytest

from ps.reliability import checkpoint
from ps.reliability.checkpoint import KEEP, latest_intact, load_range, write_manifest, write_shard

N = 25
CUT = [(0, 10), (10, 25)]                    # how the writing run's two servers cut [0, N)


def full_state(version: int):
    """Parameters and Adam-like optimizer state over the whole flat range, per version."""
    rng = np.random.default_rng(version)
    params = rng.standard_normal(N).astype(np.float32)                 # (N,) float32
    exp_avg = rng.standard_normal(N).astype(np.float32)
    exp_avg_sq = rng.random(N).astype(np.float32)
    return params, {"step": version, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def write_checkpoint(root, version: int, commit: bool = True, extra=None) -> list[dict]:
    """Every shard writes its slice; the scheduler then writes the manifest (if ``commit``)."""
    params, state = full_state(version)
    entries = []
    for shard, (lo, hi) in reversed(list(enumerate(CUT))):   # shards report in any order
        sliced = {k: (v[lo:hi] if isinstance(v, np.ndarray) else v) for k, v in state.items()}
        entries.append(write_shard(str(root), version, shard, lo, hi, params[lo:hi], sliced))
    if commit:
        write_manifest(str(root), version, entries, extra or {"step": version})
    return entries


def damage(path, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:                                     # flip bytes in the middle of the file
        mid = len(data) // 2
        for i in range(mid, mid + 8):
            data[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)


def manifests(root) -> list[str]:
    return sorted(p for p in os.listdir(root) if p.startswith("manifest-"))


# -- writing ---------------------------------------------------------------------------

def test_write_shard_leaves_only_the_final_name_and_describes_the_file(tmp_path):
    params = np.arange(4, dtype=np.float32)
    entry = write_shard(str(tmp_path), 40, 1, 6, 10, params, {"step": 3, "m": params * 2})
    assert os.listdir(tmp_path) == ["v000040"]
    assert os.listdir(tmp_path / "v000040") == ["shard-1.npz"]          # no .tmp left behind
    assert entry == {"shard": 1, "file": os.path.join("v000040", "shard-1.npz"), "lo": 6, "hi": 10,
                     "sha256": checkpoint.sha256(str(tmp_path / "v000040" / "shard-1.npz"))}
    with np.load(tmp_path / "v000040" / "shard-1.npz") as npz:
        assert sorted(npz.files) == ["hi", "lo", "opt_m", "opt_step", "params", "version"]
        assert (int(npz["lo"]), int(npz["hi"]), int(npz["version"])) == (6, 10, 40)
        assert np.array_equal(npz["params"], params)


def test_write_manifest_is_the_commit_point_and_leaves_no_temp_file(tmp_path):
    entries = write_checkpoint(tmp_path, 10, extra={"step": 10, "mode": "bsp"})
    path = tmp_path / "manifest-v000010.json"
    assert sorted(os.listdir(tmp_path)) == ["manifest-v000010.json", "v000010"]
    assert sorted(os.listdir(tmp_path / "v000010")) == ["shard-0.npz", "shard-1.npz"]
    manifest = json.loads(path.read_text())
    assert manifest == {"version": 10, "shards": sorted(entries, key=lambda s: s["lo"]),
                        "step": 10, "mode": "bsp"}
    assert [s["lo"] for s in manifest["shards"]] == [0, 10]             # sorted by range


def test_a_shard_file_without_a_manifest_is_never_chosen(tmp_path):
    assert latest_intact(str(tmp_path)) == (None, [])
    write_checkpoint(tmp_path, 10, commit=False)                         # crashed before the commit
    assert latest_intact(str(tmp_path)) == (None, [])
    write_checkpoint(tmp_path, 20)
    write_checkpoint(tmp_path, 30, commit=False)
    manifest, skipped = latest_intact(str(tmp_path))
    assert manifest["version"] == 20 and skipped == []


def test_uncommitted_versions_older_than_a_commit_are_removed(tmp_path):
    # Version 20's shards wrote their files but it was never committed (one reported it
    # late, or crashed): once 30 is committed, 20 never will be; its files go. Version
    # 40, written but not committed yet, stays.
    write_checkpoint(tmp_path, 10)
    write_checkpoint(tmp_path, 20, commit=False)
    write_checkpoint(tmp_path, 40, commit=False)
    write_checkpoint(tmp_path, 30)
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith("manifest-")) == \
        ["v000010", "v000030", "v000040"]
    assert manifests(tmp_path) == ["manifest-v000010.json", "manifest-v000030.json"]


def test_only_keep_manifests_stay_with_their_folders(tmp_path):
    versions = [10 * (i + 1) for i in range(KEEP + 2)]
    for v in versions:
        write_checkpoint(tmp_path, v)
    kept = versions[-KEEP:]
    assert manifests(tmp_path) == [f"manifest-v{v:06d}.json" for v in kept]
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith("manifest-")) == \
        [f"v{v:06d}" for v in kept]                                      # older folders removed
    assert latest_intact(str(tmp_path))[0]["version"] == versions[-1]


# -- choosing --------------------------------------------------------------------------

def test_latest_intact_is_the_newest_manifest_with_its_root(tmp_path):
    write_checkpoint(tmp_path, 10)
    entries = write_checkpoint(tmp_path, 20)
    manifest, skipped = latest_intact(str(tmp_path))
    assert skipped == []
    assert manifest == {"version": 20, "shards": sorted(entries, key=lambda s: s["lo"]),
                        "step": 20, "root": str(tmp_path)}


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, how):
    write_checkpoint(tmp_path, 10)
    write_checkpoint(tmp_path, 20)
    damage(tmp_path / "v000020" / "shard-1.npz", how)
    manifest, skipped = latest_intact(str(tmp_path))
    assert manifest["version"] == 10
    assert skipped == [f"manifest-v000020.json: {os.path.join('v000020', 'shard-1.npz')} "
                       "does not match its sha256"]


def test_a_missing_shard_file_falls_back_too(tmp_path):
    write_checkpoint(tmp_path, 10)
    write_checkpoint(tmp_path, 20)
    os.remove(tmp_path / "v000020" / "shard-0.npz")
    manifest, skipped = latest_intact(str(tmp_path))
    assert manifest["version"] == 10
    assert len(skipped) == 1 and skipped[0].startswith("manifest-v000020.json: ")
    assert "shard-0.npz" in skipped[0]


def test_a_corrupted_manifest_falls_back_too(tmp_path):
    write_checkpoint(tmp_path, 10)
    write_checkpoint(tmp_path, 20)
    (tmp_path / "manifest-v000020.json").write_text('{"version": 20, "sha')
    manifest, skipped = latest_intact(str(tmp_path))
    assert manifest["version"] == 10
    assert len(skipped) == 1 and skipped[0].startswith("manifest-v000020.json: ")


def test_nothing_intact_gives_none_and_every_reason_newest_first(tmp_path):
    write_checkpoint(tmp_path, 10)
    write_checkpoint(tmp_path, 20)
    damage(tmp_path / "v000010" / "shard-0.npz", "flip")
    damage(tmp_path / "v000020" / "shard-1.npz", "truncate")
    manifest, skipped = latest_intact(str(tmp_path))
    assert manifest is None
    assert skipped == [
        f"manifest-v000020.json: {os.path.join('v000020', 'shard-1.npz')} does not match its sha256",
        f"manifest-v000010.json: {os.path.join('v000010', 'shard-0.npz')} does not match its sha256"]


# -- loading, re-cut -----------------------------------------------------------------------

def test_round_trip_of_the_whole_range_is_exact(tmp_path):
    write_checkpoint(tmp_path, 40)
    params, state = load_range(latest_intact(str(tmp_path))[0], 0, N)
    want_params, want_state = full_state(40)
    assert params.dtype == np.float32 and np.array_equal(params, want_params)
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"]
    assert state["step"] == 40 and type(state["step"]) is int         # a scalar comes back a scalar
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].dtype == np.float32
        assert np.array_equal(state[key], want_state[key])


@pytest.mark.parametrize("lo,hi", [(0, 8), (8, 17), (17, 25), (10, 25), (9, 11), (0, 25)])
def test_load_range_recuts_the_old_shards(tmp_path, lo, hi):
    # Written as [0, 10) + [10, 25); read back as three new shards (and some other cuts).
    write_checkpoint(tmp_path, 7)
    params, state = load_range(latest_intact(str(tmp_path))[0], lo, hi)
    want_params, want_state = full_state(7)
    assert params.shape == (hi - lo,) and np.array_equal(params, want_params[lo:hi])
    assert state["step"] == 7
    for key in ("exp_avg", "exp_avg_sq"):
        assert np.array_equal(state[key], want_state[key][lo:hi])


def test_three_new_shards_concatenate_to_what_two_old_ones_wrote(tmp_path):
    write_checkpoint(tmp_path, 7)
    manifest = latest_intact(str(tmp_path))[0]
    parts = [load_range(manifest, lo, hi) for lo, hi in [(0, 8), (8, 17), (17, 25)]]
    want_params, want_state = full_state(7)
    assert np.array_equal(np.concatenate([p for p, _ in parts]), want_params)
    for key in ("exp_avg", "exp_avg_sq"):
        assert np.array_equal(np.concatenate([s[key] for _, s in parts]), want_state[key])
    assert [s["step"] for _, s in parts] == [7, 7, 7]


def test_load_reads_the_fallback_checkpoint_not_the_damaged_one(tmp_path):
    write_checkpoint(tmp_path, 10)
    write_checkpoint(tmp_path, 20)
    damage(tmp_path / "v000020" / "shard-0.npz", "flip")
    params, state = load_range(latest_intact(str(tmp_path))[0], 0, N)
    assert np.array_equal(params, full_state(10)[0])
    assert state["step"] == 10


def test_a_manifest_the_scheduler_cannot_write_is_not_counted_as_committed(tmp_path, monkeypatch):
    # The scheduler's own disk full: the version it could not commit must not appear as
    # checkpoint_committed (a recovery could not use it), is not tried again on every
    # heartbeat, and the next version commits as usual.
    from ps.reliability.server_recovery import Recovery
    from ps.scheduler.runstate import RunState
    from ps.trace import Tracer
    recovery, run = Recovery(str(tmp_path), 2, Tracer(None, "scheduler", 0)), RunState(40, 2, 40)

    def stats_at(version):
        return {k: {"checkpoint": dict(e, version=version)}
                for k, e in enumerate(write_checkpoint(tmp_path, version, commit=False))}

    calls = []

    def full_disk(*args):
        calls.append(args[1])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "write_manifest", full_disk)
    stats = stats_at(10)
    recovery.commit(stats, run)
    recovery.commit(stats, run)                  # the next heartbeat: not tried again
    assert calls == [10] and recovery.committed == 0
    assert latest_intact(str(tmp_path))[0] is None
    monkeypatch.undo()
    recovery.commit(stats_at(20), run)
    assert recovery.committed == 20 and latest_intact(str(tmp_path))[0]["version"] == 20


@pytest.fixture
def held_writes(monkeypatch):
    """Every shard file write waits until the test sets the returned event (a large shard's
    slow write, on demand)."""
    release, real = threading.Event(), checkpoint.write_shard

    def held(*args, **kwargs):
        assert release.wait(10), "the test never released the write"
        return real(*args, **kwargs)
    monkeypatch.setattr(checkpoint, "write_shard", held)
    yield release
    release.set()


def test_shard_writer_writes_in_the_background_one_at_a_time(tmp_path, held_writes):
    # The server's event loop hands the writer a snapshot and goes on; the outcome is
    # collected later, once. A second write while one is in progress is refused.
    from ps.reliability.checkpoint import ShardWriter
    release = held_writes
    params, state = full_state(40)
    writer = ShardWriter(str(tmp_path), 1, 10, 35)
    assert writer.done() is None                              # nothing started
    assert writer.start(40, params, state)
    assert writer.busy() and writer.done(0.05) is None        # still writing
    assert not writer.start(50, params, state)                # one at a time
    release.set()
    version, report, error = writer.done(10)
    assert (version, error) == (40, None) and not writer.busy() and writer.done() is None
    assert report == {"shard": 1, "file": os.path.join("v000040", "shard-1.npz"), "lo": 10,
                      "hi": 35, "sha256": checkpoint.sha256(str(tmp_path / report["file"])),
                      "version": 40}
    _, loaded = load_range({"root": str(tmp_path), "shards": [report]}, 10, 35)
    assert np.array_equal(loaded["exp_avg"], state["exp_avg"])


def test_shard_writer_reports_a_failed_write(tmp_path):
    from ps.reliability.checkpoint import ShardWriter
    (tmp_path / "v000040").write_text("a file where the version's folder goes")
    writer = ShardWriter(str(tmp_path), 0, 0, N)
    assert writer.start(40, *full_state(40))
    version, report, error = writer.done(10)
    assert version == 40 and report is None and isinstance(error, OSError)


def test_a_server_s_event_loop_goes_on_while_its_checkpoint_is_written(tmp_path, held_writes):
    # A write that takes long (a large shard) must not hold up the push that triggered
    # it, nor the heartbeats: the server answers at once and reports the checkpoint
    # when the write is done.
    from inproc import InProcessServer
    from ps.server.checkpoints import Checkpoints
    release = held_writes
    srv = InProcessServer(1000)
    try:
        s = srv.server
        s.checkpoints = Checkpoints(1, str(tmp_path), 0, 0, 1000, s.errors)   # every version
        srv.init(np.zeros(1000, np.float32))
        server = threading.Thread(target=srv.serve_one)
        server.start()
        t0 = time.monotonic()
        reply = srv.client.push(np.ones(1000, np.float32), 0, tasks=[0], samples=1,
                                step_tasks=1)
        answered_s = time.monotonic() - t0
        server.join(10)
        assert reply[0]["version"] == 1 and answered_s < 5    # answered while still writing
        assert s.checkpoints.busy() and s.stats()["checkpoint"] is None
        release.set()
        s._collect_checkpoint(wait_s=10)
        assert s.stats()["checkpoint"]["version"] == 1 and s.next_beat == 0.0   # reported now
        with np.load(tmp_path / "v000001" / "shard-0.npz") as npz:
            assert np.allclose(npz["params"], -0.1)                # version 1: 0 - 0.1 * 1
    finally:
        srv.close()
