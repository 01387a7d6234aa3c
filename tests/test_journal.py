"""The scheduler's journal (ps.reliability.journal) and the membership a restart rebuilds from it.

What a restart relies on: records come back as written, in order; a torn last record
(the process died inside a write) or a damaged tail is dropped and later records are
appended after the last whole one; an incarnation written to the journal is never
handed out again; a member known only from the journal is asked to register again
(``reregister``) and, once it has, is a member like any other. Pure file and
bookkeeping operations: milliseconds each.
"""
import os

import pytest

from ps.reliability.journal import Journal, fingerprint, next_incarnation, read
from ps.scheduler.membership import Membership
from ps.wire.protocol import Error, ProtocolError
from ps.scheduler.config import SchedulerConfig


def test_records_round_trip_in_order(tmp_path):
    path = str(tmp_path / "j")
    j = Journal(path)
    j.config(fingerprint(SchedulerConfig()))
    j.dealt(0, 4)
    j.report({"worker": 1, "inc": 3, "rid": 7, "step": 0, "tasks": [0, 2], "rejected": [],
              "loss_sum": 1.5, "samples": 12, "compute_s": 0.1, "wait_s": 0.0})
    j.commit(10)
    j.close()
    records, end = read(path)
    assert [r["t"] for r in records] == ["config", "dealt", "report", "commit"]
    assert records[0]["config"] == fingerprint(SchedulerConfig())
    assert records[2]["tasks"] == [0, 2] and records[2]["loss_sum"] == 1.5
    assert end == os.path.getsize(path)
    assert Journal(path).records == records                  # reopened: the same, to replay


@pytest.mark.parametrize("damage", ["torn", "garbled"])
def test_a_damaged_last_record_is_dropped_and_appending_goes_on_after_the_whole_ones(tmp_path, damage):
    path = str(tmp_path / "j")
    j = Journal(path)
    for rnd in range(3):
        j.dealt(rnd, 4)
    j.close()
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if damage == "torn":
            f.truncate(size - 3)                          # died inside the last write
        else:
            f.seek(size - 2)
            f.write(b"\xff\xff")                          # its checksum no longer matches
    records, end = read(path)
    assert [r["round"] for r in records] == [0, 1]
    j = Journal(path)
    assert [r["round"] for r in j.records] == [0, 1]
    j.dealt(7, 4)
    j.close()
    assert [r["round"] for r in read(path)[0]] == [0, 1, 7]   # no garbage between


def test_a_missing_or_empty_journal_has_no_records(tmp_path):
    assert read(str(tmp_path / "none")) == ([], 0)
    assert Journal(None).records == []
    Journal(None).dealt(3, 4)                                    # a journal that writes nothing


def test_incarnations_in_the_journal_are_never_handed_out_again():
    records = [{"t": "config"},
               {"t": "formed", "members": [["server", 0, 1], ["worker", 0, 2], ["worker", 1, 3]]},
               {"t": "dead", "role": "worker", "index": 1, "inc": 3},
               {"t": "member", "role": "worker", "index": 1, "inc": 9}]
    m = Membership(next_inc=next_incarnation(records))
    for role, index, inc in records[1]["members"]:
        m.restore(role, index, inc, 0.0)
    m.restore("worker", 1, 9, 0.0)
    fresh = [m.join("worker", 1, 0.0).inc for _ in range(5)]
    assert min(fresh) > 9 and len(set(fresh)) == 5
    assert next_incarnation([{"t": "config"}]) == 1           # forming: nothing handed out yet


def test_a_member_known_from_the_journal_must_register_again():
    m = Membership()
    m.restore("worker", 0, 4, now=0.0)
    with pytest.raises(ProtocolError) as info:
        m.seen("worker", 0, 4, 1.0)
    assert info.value.code == Error.REREGISTER
    with pytest.raises(ProtocolError) as info:                # another incarnation: fenced
        m.register_again("worker", 0, 5, 1.0)
    assert info.value.code == Error.FENCED
    m.register_again("worker", 0, 4, 1.0)
    assert m.seen("worker", 0, 4, 2.0).last_seen == 2.0
    assert m.overdue(2.5) == []
    m.restore("server", 0, 6, now=0.0)                        # never back: dead as usual
    assert [x.index for x in m.overdue(100.0)] == [0, 0]


def test_a_restart_cuts_each_dealt_round_as_the_journal_says(tmp_path):
    # With the adaptive grain a task id names other samples in a step cut otherwise: a
    # restarted scheduler reads each round's cut from its "dealt" record before any report.
    from types import SimpleNamespace

    from ps.core.dealer import Dealer
    from ps.core.tasks import TaskPlan
    from ps.reliability.scheduler_restart import Reform
    path = str(tmp_path / "j")
    j = Journal(path)
    j.dealt(0, 2)
    j.dealt(1, 8)
    j.dealt(2, 2)
    j.close()
    plan = TaskPlan(num_samples=640, batch_size=64, tasks_per_step=8, shuffle=False)
    reform = Reform(SimpleNamespace(dealer=Dealer(plan, 2, 10, adaptive=True)), 3)
    for record in Journal(path).records:
        reform.apply(record, plan, 0.0)
    assert reform.dealt == {0, 1, 2}
    assert [plan.num_tasks(step) for step in range(4)] == [2, 8, 2, 8]   # step 3: not dealt
    assert plan.ids(2) == [16, 17] and plan.task_size(17) == 32 and plan.task_size(18) is None
