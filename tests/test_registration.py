"""What the scheduler accepts from its members before it keeps any of it (ps.scheduler.registration).

A worker's job is checked when it registers, field by field, so the cluster can never
fail to form later with every other member's registration held; a server's counters
(heartbeats, REGISTER after a scheduler restart), and any member's message-fault
counters, are checked before the scheduler computes with them (failover, checkpoint
commits, the summary). And should the scheduler
meet a bug of its own between messages, the run ends with a reason, not a traceback.
"""
import numpy as np
import pytest

from ps.reliability import checkpoint
from ps.wire.protocol import Error, ProtocolError
from ps.scheduler import summary
from ps.scheduler.registration import layout_size, net_faults, server_stats, worker_job
from ps.scheduler.config import SchedulerConfig
from ps.core.shard import Shard

JOB = {"layout": [["w", [3, 4]], ["b", [4]]], "dataset_size": 64, "batch_size": 8,
       "shuffle": True, "optimizer": {"name": "sgd", "lr": 0.1}, "epochs": None, "seed": 0}


def refused(code, fn, *args):
    with pytest.raises(ProtocolError) as info:
        fn(*args)
    assert info.value.code == code, info.value.reason
    return info.value.reason


def test_an_honest_job_is_accepted_and_sized():
    assert worker_job(dict(JOB), SchedulerConfig(servers=2), []) == {
        **{k: v for k, v in JOB.items() if k != "seed"}, "param_groups": None, "lr_at": None,
        "clip": None, "outer_optimizer": None, "sparse": None}
    assert layout_size(JOB["layout"]) == 16
    assert layout_size([["empty", [0, 5]], ["scalar", []]]) == 1     # torch allows both


@pytest.mark.parametrize("layout", [
    "w", [["w"]], [["w", [3], "x"]], [[3, [3]]], [["w", 3]], [["w", [-1]]], [["w", [2.5]]],
    [["w", [True]]], [["w", ["3"]]], [{"w": [3]}]])
def test_a_malformed_layout_is_refused(layout):
    job = dict(JOB, layout=layout)
    code = Error.MISSING_FIELD if not isinstance(layout, list) else Error.BAD_FIELD
    refused(code, worker_job, job, SchedulerConfig(), [])


@pytest.mark.parametrize("field, value", [
    ("dataset_size", 0), ("batch_size", 0), ("batch_size", -8), ("shuffle", 1),
    ("shuffle", None), ("epochs", 0), ("epochs", 1.5)])
def test_sizes_and_options_out_of_range_are_refused(field, value):
    refused(Error.BAD_FIELD, worker_job, dict(JOB, **{field: value}), SchedulerConfig(), [])


def test_a_model_smaller_than_the_shard_count_is_refused_at_registration():
    # Before, this passed registration and failed when the cluster formed, answering only
    # the last member to register while every other registration stayed held.
    job = dict(JOB, layout=[["w", [3]]])
    reason = refused(Error.BAD_FIELD, worker_job, job, SchedulerConfig(servers=4), [])
    assert "3 parameters" in reason and "4 shards" in reason
    worker_job(job, SchedulerConfig(servers=3), [])


@pytest.mark.parametrize("field", ["dataset_size", "batch_size"])
def test_a_bool_is_not_a_size(field):
    refused(Error.MISSING_FIELD, worker_job, dict(JOB, **{field: True}), SchedulerConfig(), [])


def honest_stats(tmp_path, index=1):
    """What a server's heartbeat carries, with a checkpoint report written for real."""
    shard = Shard(10, {"name": "adam"}, "bsp", 0, 2)
    shard.init([np.arange(10, dtype=np.float32)])
    stats = shard.stats()
    report = checkpoint.write_shard(str(tmp_path), 40, index, 6, 16, shard.params,
                                    shard.optimizer.state())
    stats.update(errors={}, copies={}, checkpoint=dict(report, version=40))
    return stats


SHARD_MAP = [{"index": 0, "endpoint": "tcp://a:1", "lo": 0, "hi": 6},
             {"index": 1, "endpoint": "tcp://b:1", "lo": 6, "hi": 16}]


def test_a_server_s_honest_stats_pass_unchanged(tmp_path):
    stats = honest_stats(tmp_path)
    assert server_stats(stats, 1, SHARD_MAP) is stats
    assert server_stats(stats, 1, None) is stats          # before the cluster has formed
    assert server_stats(dict(stats, checkpoint=None), 1, SHARD_MAP)["checkpoint"] is None


def test_a_checkpoint_report_must_name_the_shard_s_own_range(tmp_path):
    # Resuming trusts the manifest's ranges (load_range): a report of another range
    # would put another shard's bytes, or none, where this shard's belong.
    stats = honest_stats(tmp_path)                      # a report of [6, 16)
    other = [dict(SHARD_MAP[0]), dict(SHARD_MAP[1], lo=5)]
    refused(Error.BAD_FIELD, server_stats, stats, 1, other)


@pytest.mark.parametrize("change", [
    {"version": "7"}, {"version": -1}, {"version": True}, {"max_staleness": 1.5},
    {"duplicates_rejected": None}, {"fenced_rejected": [1]},
    {"checkpoint": "v000040"}, {"checkpoint": {}},
    {"checkpoint": {"file": "../../etc/passwd"}}, {"checkpoint": {"file": "/tmp/x.npz"}},
    {"checkpoint": {"shard": 0}}, {"checkpoint": {"version": "40"}},
    {"checkpoint": {"lo": 16}}, {"checkpoint": {"sha256": "0" * 63}},
    {"checkpoint": {"sha256": None}}])
def test_stats_the_scheduler_computes_with_must_be_what_a_server_sends(tmp_path, change):
    stats = honest_stats(tmp_path)
    key, value = next(iter(change.items()))
    if key == "checkpoint" and isinstance(value, dict) and value:
        value = dict(stats["checkpoint"], **value)
    refused(Error.BAD_FIELD, server_stats, dict(stats, **{key: value}), 1, SHARD_MAP)


def test_stats_must_be_a_map():
    refused(Error.BAD_FIELD, server_stats, [1, 2], 0, None)


NET_FAULTS = {"dropped": 3, "duplicated": 1, "delayed": 40}


@pytest.mark.parametrize("bad", [
    [3, 1, 40], {"dropped": 3, "duplicated": 1}, dict(NET_FAULTS, dropped=-1),
    dict(NET_FAULTS, delayed=1.5), dict(NET_FAULTS, duplicated=True), dict(NET_FAULTS, lost=1)])
def test_message_fault_counters_are_three_counts(tmp_path, bad):
    # Summed into the summary's net_faults, from a server's stats or a worker's heartbeat.
    assert net_faults(dict(NET_FAULTS)) == NET_FAULTS
    stats = honest_stats(tmp_path)
    assert server_stats(dict(stats, net_faults=NET_FAULTS), 1, SHARD_MAP)["net_faults"] == NET_FAULTS
    refused(Error.BAD_FIELD, net_faults, bad)
    refused(Error.BAD_FIELD, server_stats, dict(stats, net_faults=bad), 1, SHARD_MAP)


def test_the_summary_lists_each_role_s_message_faults_a_worker_s_incarnations_summed():
    shards = {0: {"version": 3, "net_faults": NET_FAULTS}, 1: {"version": 3}}
    workers = {(0, 4): NET_FAULTS, (1, 5): NET_FAULTS, (1, 9): dict(NET_FAULTS, dropped=1)}
    assert summary.net_faults(dict(NET_FAULTS, delayed=7), shards, workers) == {
        "scheduler": dict(NET_FAULTS, delayed=7), "server0": NET_FAULTS, "worker0": NET_FAULTS,
        "worker1": {"dropped": 4, "duplicated": 2, "delayed": 80}}
    assert summary.net_faults(None, {0: {"version": 3}}, {}) == {}


def test_a_refused_heartbeat_changes_nothing_not_even_liveness(tmp_path):
    # The scheduler's handler, called as its loop would: bad counters are refused before
    # the member is marked as heard from or its counters kept, whatever the incarnation.
    from ps.wire.protocol import Kind, encode, decode
    from ps.scheduler.scheduler import Scheduler

    sched = Scheduler(SchedulerConfig(servers=2))
    try:
        member = sched.members.join("server", 1, now=100.0)
        sched.shard_map = SHARD_MAP
        for inc in (member.inc, member.inc + 5):            # the live one, and a stranger
            header = decode(encode(Kind.HEARTBEAT, 7, role="server", index=1, inc=inc,
                                   stats={"version": "9"}))
            refused(Error.BAD_FIELD, sched.on_heartbeat, b"server1", header)
        assert sched.shard_stats == {} and member.last_seen == 100.0
        good = honest_stats(tmp_path)
        sched.on_heartbeat(b"server1", decode(encode(Kind.HEARTBEAT, 8, role="server", index=1,
                                                     inc=member.inc, stats=good)))
        assert sched.shard_stats == {1: good} and member.last_seen > 100.0
        # A worker's message-fault counters, likewise: refused whole, or kept by incarnation.
        worker = sched.members.join("worker", 0, now=100.0)
        refused(Error.BAD_FIELD, sched.on_heartbeat, b"worker0", decode(encode(
            Kind.HEARTBEAT, 9, role="worker", index=0, inc=worker.inc, net_faults={"dropped": -1})))
        assert sched.worker_net_faults == {} and worker.last_seen == 100.0
        sched.on_heartbeat(b"worker0", decode(encode(Kind.HEARTBEAT, 10, role="worker", index=0,
                                                     inc=worker.inc, net_faults=NET_FAULTS)))
        assert sched.worker_net_faults == {(0, worker.inc): NET_FAULTS}
    finally:
        sched.close()


def test_a_bug_between_messages_ends_the_run_with_a_reason_not_a_traceback(tmp_path, monkeypatch):
    # Whatever the scheduler does between messages (liveness, stall logs, deadlines) runs
    # outside a request's error handling: an exception there must still end the run
    # through fail() (the summary, exit status 1), not kill the process.
    from ps.scheduler.scheduler import Scheduler

    sched = Scheduler(SchedulerConfig(out=str(tmp_path), timeout_s=0.0))

    def broken():
        raise KeyError("a bug")
    monkeypatch.setattr(sched, "_waiting_for", broken)   # called once the deadline passes
    try:
        assert sched.serve() == 1
    finally:
        sched.close()
    assert sched.failure == "internal error: KeyError('a bug')"
