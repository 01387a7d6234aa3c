"""Membership and fencing (ps.scheduler.membership), and payload-frame refusal (ps.wire.protocol.check_frames).

What the rest of the system relies on: an incarnation is never given out twice; any
message from a retired, replaced or unknown incarnation is refused with
``Error.FENCED``; a member is overdue only when silent for *longer* than
``dead_after_s`` (Paranoid Pirate liveness, with the time fed in, so no clocks here);
retiring a worker lists ``[worker, incarnation]`` in ``fenced`` for the servers.
``check_frames`` is the other refusal made before any state changes: payload frames
on a kind that carries none. Pure functions: microseconds each.
"""
import pytest

from ps.scheduler.membership import Membership
from ps.wire.protocol import PAYLOAD_KINDS, SCHEMA, Error, Kind, ProtocolError, check_frames


def fenced_error(call) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        call()
    assert info.value.code == Error.FENCED, info.value
    return info.value


# -- incarnations --------------------------------------------------------------------

def test_every_join_gets_a_fresh_incarnation_never_reused():
    m = Membership()
    incs = [m.join("server", 0, 0.0).inc, m.join("worker", 0, 0.0).inc,
            m.join("worker", 1, 0.0).inc]
    for _ in range(3):                                    # the same ids register again
        incs.append(m.join("worker", 1, 1.0).inc)
        incs.append(m.join("server", 0, 1.0).inc)
    assert len(set(incs)) == len(incs) == 9
    assert incs == sorted(incs)                           # handed out in increasing order
    assert m.members[("worker", 1)].inc == incs[-2]       # the newest incarnation is the member


def test_join_records_role_index_and_time():
    m = Membership()
    member = m.join("worker", 3, 12.5)
    assert (member.role, member.index, member.last_seen, member.alive) == ("worker", 3, 12.5, True)
    assert m.members == {("worker", 3): member}


# -- seen: any message is a sign of life, or a refusal --------------------------------

def test_seen_updates_last_seen_of_the_live_incarnation():
    m = Membership()
    member = m.join("worker", 0, 1.0)
    assert m.seen("worker", 0, member.inc, 4.0) is member
    assert member.last_seen == 4.0


def test_seen_refuses_an_unknown_member():
    m = Membership()
    m.join("worker", 0, 0.0)
    err = fenced_error(lambda: m.seen("worker", 1, 1, 1.0))
    assert "worker 1" in err.reason
    fenced_error(lambda: m.seen("server", 0, 1, 1.0))     # same index, other role: unknown


def test_seen_refuses_a_wrong_incarnation_and_changes_nothing():
    m = Membership()
    member = m.join("worker", 0, 1.0)
    fenced_error(lambda: m.seen("worker", 0, member.inc + 1, 5.0))
    assert member.last_seen == 1.0


def test_seen_refuses_a_retired_incarnation_even_with_the_right_number():
    m = Membership()
    member = m.join("worker", 0, 1.0)
    m.retire(member)
    fenced_error(lambda: m.seen("worker", 0, member.inc, 5.0))
    assert member.last_seen == 1.0


def test_a_replacement_is_accepted_and_the_old_incarnation_stays_refused():
    m = Membership()
    old = m.join("worker", 2, 0.0)
    m.retire(old)
    new = m.join("worker", 2, 10.0)
    assert m.seen("worker", 2, new.inc, 11.0) is new
    fenced_error(lambda: m.seen("worker", 2, old.inc, 11.0))   # it woke up from a pause
    assert m.live("worker") == [2]


# -- liveness -------------------------------------------------------------------------

def test_overdue_only_after_longer_than_dead_after_s():
    m = Membership(dead_after_s=3.0)
    a = m.join("worker", 0, 0.0)
    b = m.join("server", 0, 0.0)
    assert m.overdue(2.0) == []
    assert m.overdue(3.0) == []                           # exactly dead_after_s: not yet
    assert m.overdue(3.25) == [a, b]


def test_seen_postpones_the_verdict():
    m = Membership(dead_after_s=3.0)
    a = m.join("worker", 0, 0.0)
    b = m.join("worker", 1, 0.0)
    m.seen("worker", 1, b.inc, 2.0)
    assert m.overdue(4.0) == [a]
    assert m.overdue(5.0) == [a]
    assert m.overdue(5.5) == [a, b]


def test_retired_members_are_never_overdue_again():
    m = Membership(dead_after_s=1.0)
    a = m.join("worker", 0, 0.0)
    m.retire(a)
    assert m.overdue(100.0) == []


def test_default_dead_after_s_is_the_module_constant():
    from ps.wire.protocol import DEAD_AFTER_S, HEARTBEAT_INTERVAL_S
    assert Membership().dead_after_s == DEAD_AFTER_S
    assert DEAD_AFTER_S > HEARTBEAT_INTERVAL_S            # several missed beats, not one


# -- retire, live, is_fenced -----------------------------------------------------------

def test_retire_fences_workers_as_worker_and_incarnation_pairs():
    m = Membership()
    m.join("server", 0, 0.0)
    w0 = m.join("worker", 0, 0.0)
    w1 = m.join("worker", 1, 0.0)
    m.retire(w1)
    assert m.fenced == [[1, w1.inc]]
    w1b = m.join("worker", 1, 5.0)
    m.retire(w1b)
    m.retire(w0)
    assert m.fenced == [[1, w1.inc], [1, w1b.inc], [0, w0.inc]]


def test_retiring_a_server_fences_nothing_on_the_servers_but_it_is_no_longer_live():
    m = Membership()
    s = m.join("server", 1, 0.0)
    m.retire(s)
    assert m.fenced == []                                 # the list is for servers to refuse workers
    assert s.alive is False
    assert m.live("server") == []
    assert m.is_fenced("server", 1, s.inc)


def test_live_lists_live_indexes_of_one_role_sorted():
    m = Membership()
    for i in (3, 0, 2, 1):
        m.join("worker", i, 0.0)
    m.join("server", 0, 0.0)
    m.retire(m.members[("worker", 2)])
    assert m.live("worker") == [0, 1, 3]
    assert m.live("server") == [0]
    assert m.live("scheduler") == []


def test_is_fenced():
    m = Membership()
    w = m.join("worker", 0, 0.0)
    assert m.is_fenced("worker", 0, w.inc) is False
    assert m.is_fenced("worker", 0, w.inc + 1) is True    # wrong incarnation
    assert m.is_fenced("worker", 1, w.inc) is True        # unknown member
    m.retire(w)
    assert m.is_fenced("worker", 0, w.inc) is True        # retired


# -- check_frames: payload only where a kind carries one --------------------------------

NO_PAYLOAD_KINDS = sorted(set(SCHEMA) - PAYLOAD_KINDS)


def test_only_init_push_schedule_and_the_sparse_kinds_carry_payload():
    assert PAYLOAD_KINDS == {Kind.INIT, Kind.PUSH, Kind.SCHEDULE, Kind.SPARSE_PULL,
                             Kind.SPARSE_PUSH}


@pytest.mark.parametrize("kind", NO_PAYLOAD_KINDS)
def test_payload_frames_on_a_kind_without_payload_are_refused(kind):
    for payload in ([b"x"], [b"", b""], [memoryview(b"\0" * 8)]):
        with pytest.raises(ProtocolError) as info:
            check_frames(kind, payload)
        assert info.value.code == Error.BAD_FRAMES
        assert kind in info.value.reason and str(len(payload)) in info.value.reason


@pytest.mark.parametrize("kind", NO_PAYLOAD_KINDS)
def test_a_kind_without_payload_accepts_no_frames(kind):
    assert check_frames(kind, []) is None


@pytest.mark.parametrize("kind", sorted(PAYLOAD_KINDS))
def test_init_and_push_accept_payload_frames(kind):
    assert check_frames(kind, [b"\0" * 16, b"\0" * 4]) is None
    assert check_frames(kind, []) is None       # ps.wire.transport.check_payload weighs it against size
