"""Fault specs (ps.faults): what ``--inject`` accepts, what it refuses, and when a fault is due.

A process fault is ``action:target@trigger=at[,for=Ns]``; a message fault is
``drop:P``, ``dup:P`` or ``delay:Nms``. A bad spec must be refused up front with a
ValueError that quotes it, never half-applied mid-run. ``Fault.due`` fires once, at
the first report at or past its step (or time). Pure parsing; no processes.
"""
import pytest

from ps.faults import Fault, parse, parse_net, split


# -- process faults ----------------------------------------------------------------------

@pytest.mark.parametrize("spec,want", [
    ("kill:worker1@step=20", ("kill", "worker1", "step", 20.0, 0.0)),
    ("kill:worker0@time=3s", ("kill", "worker0", "time", 3.0, 0.0)),
    ("kill:worker12@time=1.5s", ("kill", "worker12", "time", 1.5, 0.0)),
    ("kill:server0@step=30", ("kill", "server0", "step", 30.0, 0.0)),
    ("kill:scheduler@step=5", ("kill", "scheduler", "step", 5.0, 0.0)),
    ("pause:worker1@step=10,for=5s", ("pause", "worker1", "step", 10.0, 5.0)),
    ("pause:server0@time=2s,for=0.5s", ("pause", "server0", "time", 2.0, 0.5)),
])
def test_parse_process_faults(spec, want):
    f = parse(spec)
    assert (f.action, f.target, f.trigger, f.at, f.duration_s) == want
    assert f.spec == spec
    assert (f.fired_at_s, f.resumed) == (None, False)


def test_parse_strips_surrounding_space_and_keeps_the_clean_spec():
    f = parse("  kill:worker1@step=20\n")
    assert (f.target, f.at, f.spec) == ("worker1", 20.0, "kill:worker1@step=20")


def test_a_pause_needs_a_duration():
    with pytest.raises(ValueError) as info:
        parse("pause:worker1@step=10")
    assert "'pause:worker1@step=10'" in str(info.value) and ",for=" in str(info.value)


@pytest.mark.parametrize("spec", [
    "", "kill", "kill:worker1", "kill:worker1@step", "kill:worker1@step=",
    "kill:worker@step=2",                    # a worker needs its id
    "kill:client0@step=2",                   # unknown role
    "stop:worker1@step=2",                   # unknown action
    "KILL:worker1@step=2",                   # case matters
    "kill:worker1@epoch=2",                  # unknown trigger
    "kill:worker1@step=-1",
    "kill:worker1@time=3ms",
    "kill:worker1 @step=2",
    "pause:worker1@step=10,for=5",           # the duration needs its unit
    "pause:worker1@step=10,for=5ms",
    "pause:worker1@step=10,for=",
    "kill:worker1@step=20;kill:worker2@step=20",
])
def test_bad_process_specs_are_refused_naming_the_spec(spec):
    with pytest.raises(ValueError) as info:
        parse(spec)
    assert repr(spec) in str(info.value)


# -- Fault.due -----------------------------------------------------------------------------

def test_a_step_fault_is_due_at_and_after_its_step_whatever_the_time():
    f = parse("kill:worker1@step=20")
    assert not f.due(19, 1e6)
    assert f.due(20, 0.0)
    assert f.due(25, 0.0)                    # a report can jump past the step


def test_a_time_fault_is_due_at_and_after_its_time_whatever_the_step():
    f = parse("kill:worker1@time=3s")
    assert not f.due(10**6, 2.999)
    assert f.due(0, 3.0)
    assert f.due(0, 4.5)


def test_a_fault_that_fired_is_never_due_again():
    f = parse("pause:worker1@step=10,for=5s")
    assert f.due(10, 0.0)
    f.fired_at_s = 1.25
    assert not f.due(10, 2.0) and not f.due(100, 100.0)


def test_fault_defaults():
    f = Fault("kill", "worker0", "step", 3)
    assert (f.duration_s, f.fired_at_s, f.resumed, f.spec) == (0.0, None, False, "")


# -- message faults ------------------------------------------------------------------------

@pytest.mark.parametrize("spec,want", [
    ("drop:0.02", ("drop", 0.02)),
    ("dup:0.5", ("dup", 0.5)),
    ("dup:0.02", ("dup", 0.02)),
    ("drop:.5", ("drop", 0.5)),
    ("drop:0", ("drop", 0.0)),
    ("drop:1", ("drop", 1.0)),
    ("delay:5ms", ("delay_ms", 5.0)),
    ("delay:0.5ms", ("delay_ms", 0.5)),
    ("delay:250ms", ("delay_ms", 250.0)),
    (" drop:0.1 ", ("drop", 0.1)),
])
def test_parse_net_accepts(spec, want):
    assert parse_net(spec) == want


@pytest.mark.parametrize("spec", [
    "drop:2", "dup:1.5", "drop:-0.1", "drop:00.1", "drop:1e-3", "drop:0.", "drop:", "drop",
    "delay:5s", "delay:5", "delay:5 ms", "delay:-5ms", "delay:ms",
    "lose:0.1", "kill:worker1@step=20",
])
def test_parse_net_rejects(spec):
    assert parse_net(spec) is None


def test_parse_net_accepts_a_probability_of_one_written_as_a_decimal():
    assert parse_net("drop:1.0") == ("drop", 1.0)


def test_split_separates_process_faults_from_message_faults():
    faults, net = split(["drop:0.02", "kill:worker1@step=20", "delay:5ms",
                         "pause:server0@time=2s,for=1s", "dup:0.5"])
    assert [(f.action, f.target) for f in faults] == [("kill", "worker1"), ("pause", "server0")]
    assert net == {"drop": 0.02, "delay_ms": 5.0, "dup": 0.5}


def test_split_of_nothing():
    assert split([]) == ([], {})


def test_split_a_repeated_message_fault_keeps_the_last():
    assert split(["drop:0.1", "drop:0.2"]) == ([], {"drop": 0.2})


@pytest.mark.parametrize("bad", ["drop:2", "delay:5s", "kill:worker1@step=x", "pause:worker1@step=1"])
def test_split_refuses_a_bad_spec_naming_it(bad):
    with pytest.raises(ValueError) as info:
        split(["drop:0.02", bad, "kill:worker1@step=20"])
    assert repr(bad) in str(info.value)
