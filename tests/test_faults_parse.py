"""Fault specs (ps.faults.inject): what ``--inject`` accepts, what it refuses, and when a fault is due.

A process fault is ``action:target@trigger=at[,for=Ns]``; a message fault is
``drop:P``, ``dup:P`` or ``delay:Nms``; a link fault (--netns) is ``partition:ROLE``,
``cut:SRC->DST`` or ``flap:ROLE`` with a trigger, ``for=`` and (flap) ``period=``. A bad
spec must be refused up front with a ValueError that quotes it, never half-applied
mid-run. ``Fault.due`` fires once, at the first report at or past its step (or time);
``LinkFault.update`` takes a link down and up on time. The ``ip`` command lines of
``ps.launch.netns`` are checked here too. Pure; no processes, no root.
"""
import pytest

from ps.launch import netns
from ps.faults.inject import Fault, LinkFault, parse, parse_link, parse_net, split, split_links


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


# -- link faults (--netns) -------------------------------------------------------------------

@pytest.mark.parametrize("spec,want", [
    ("partition:worker1@step=10,for=4s", ("partition", "worker1", None, "step", 10.0, 4.0, 0.0)),
    ("partition:server0@time=2.5s,for=0.5s", ("partition", "server0", None, "time", 2.5, 0.5, 0.0)),
    ("partition:scheduler@step=3,for=1s", ("partition", "scheduler", None, "step", 3.0, 1.0, 0.0)),
    ("cut:worker1->server0@step=10,for=4s", ("cut", "worker1", "server0", "step", 10.0, 4.0, 0.0)),
    ("cut:server1->scheduler@time=1s,for=2s", ("cut", "server1", "scheduler", "time", 1.0, 2.0, 0.0)),
    ("flap:worker1@step=5,for=6s,period=1s", ("flap", "worker1", None, "step", 5.0, 6.0, 1.0)),
    (" flap:server0@time=0s,for=3s,period=0.4s ", ("flap", "server0", None, "time", 0.0, 3.0, 0.4)),
])
def test_parse_link_faults(spec, want):
    f = parse_link(spec)
    assert (f.action, f.target, f.dst, f.trigger, f.at, f.duration_s, f.period_s) == want
    assert f.spec == spec.strip()
    assert (f.fired_at_s, f.healed_at_s, f.down) == (None, None, False)


@pytest.mark.parametrize("spec", [
    "partition:worker1@step=10",                 # no duration: a link is always restored
    "partition:worker1@step=10,for=4",           # the duration needs its unit
    "partition:worker1@step=10,for=0s",
    "partition:worker@step=10,for=4s",
    "partition:worker1->server0@step=10,for=4s",  # only a cut names a receiver
    "cut:worker1@step=10,for=4s",                # a cut needs one
    "cut:worker1->worker1@step=10,for=4s",
    "cut:worker1->client0@step=10,for=4s",
    "cut:worker1=>server0@step=10,for=4s",
    "flap:worker1@step=5,for=6s",                # a flap needs its period
    "flap:worker1@step=5,for=6s,period=0s",
    "partition:worker1@step=5,for=6s,period=1s",  # only a flap has one
    "partition:worker1@epoch=5,for=6s",
    "flap:worker1@step=5,period=1s,for=6s",      # fixed order
])
def test_bad_link_specs_are_refused_naming_the_spec(spec):
    with pytest.raises(ValueError) as info:
        parse_link(spec)
    assert repr(spec) in str(info.value)


def test_split_leaves_link_faults_to_split_links():
    specs = ["kill:worker1@step=20", "partition:worker1@step=10,for=4s", "drop:0.1",
             "cut:worker0->server1@time=1s,for=1s"]
    faults, net = split(specs)
    assert [f.spec for f in faults] == ["kill:worker1@step=20"] and net == {"drop": 0.1}
    assert [f.spec for f in split_links(specs)] == specs[1::2]
    with pytest.raises(ValueError):
        split_links(["partition:worker1@step=10"])


def test_a_partition_goes_down_when_due_and_up_after_its_duration():
    f = parse_link("partition:worker1@step=10,for=4s")
    assert f.update(None, None, now=100.0) is None            # outside training: never fires
    assert f.update(9, 5.0, now=100.0) is None
    assert f.update(10, 5.0, now=100.0) is True               # down
    assert (f.fired_at_s, f.down) == (5.0, True)
    assert f.update(20, 8.9, now=103.9) is None               # still down
    assert f.update(None, None, now=104.0) is False           # heals even outside training
    assert f.healed_at_s == 9.0 and f.cuts == [[100.0, 104.0]]
    assert f.update(30, 20.0, now=200.0) is None              # done for good


def test_a_flap_goes_down_for_the_first_half_of_each_period_and_ends_up():
    f = parse_link("flap:worker1@time=1s,for=3s,period=1s")
    states = []
    for tenth in range(0, 50):
        now = 10.0 + tenth / 10
        change = f.update(0, 1.0 + tenth / 10, now)
        if change is not None:
            states.append((round(now - 10.0, 1), change))
    assert states == [(0.0, True), (0.5, False), (1.0, True), (1.5, False), (2.0, True),
                      (2.5, False)]
    assert f.healed_at_s == 4.0 and not f.down
    assert [[round(t - 10.0, 1) for t in cut] for cut in f.cuts] == [[0.0, 0.5], [1.0, 1.5],
                                                                    [2.0, 2.5]]


def test_wanted_down():
    cut = LinkFault("cut", "worker1", "step", 1, 2.0, dst="server0")
    assert cut.wanted_down(0.0) and cut.wanted_down(1.99) and not cut.wanted_down(2.0)


# -- ps.launch.netns: the ip command lines -----------------------------------------------------

PLAN = netns.Plan("a1b2c3", 42, ("scheduler", "server0", "worker0", "worker1"))


def test_plan_names_and_addresses():
    assert PLAN.bridge == "psbra1b2c3" and PLAN.gateway == "10.77.42.1"
    assert PLAN.namespace("server0") == "ps-a1b2c3-server0"
    assert [PLAN.address(r) for r in PLAN.roles] == ["10.77.42.2", "10.77.42.3", "10.77.42.4",
                                                     "10.77.42.5"]
    assert PLAN.veth("worker1") == "psa1b2c3h3"
    assert all(len(PLAN.veth(r)) <= 15 and len(PLAN.bridge) <= 15 for r in PLAN.roles)  # IFNAMSIZ
    assert PLAN.exec_prefix("worker0") == ["ip", "netns", "exec", "ps-a1b2c3-worker0"]


def test_setup_builds_a_bridge_then_a_namespace_and_veth_per_role():
    cmds = [" ".join(c) for c in netns.setup_commands(PLAN)]
    assert cmds[:3] == ["ip link add psbra1b2c3 type bridge",
                        "ip addr add 10.77.42.1/24 dev psbra1b2c3", "ip link set psbra1b2c3 up"]
    assert cmds[3:9] == [
        "ip netns add ps-a1b2c3-scheduler",
        "ip link add psa1b2c3h0 type veth peer name eth0 netns ps-a1b2c3-scheduler",
        "ip link set psa1b2c3h0 master psbra1b2c3 up",
        "ip -n ps-a1b2c3-scheduler addr add 10.77.42.2/24 dev eth0",
        "ip -n ps-a1b2c3-scheduler link set eth0 up",
        "ip -n ps-a1b2c3-scheduler link set lo up"]
    assert len(cmds) == 3 + 6 * len(PLAN.roles)


def test_teardown_removes_every_veth_namespace_and_the_bridge():
    cmds = [" ".join(c) for c in netns.teardown_commands(PLAN)]
    for role in PLAN.roles:
        assert f"ip link del {PLAN.veth(role)}" in cmds
        assert f"ip netns del {PLAN.namespace(role)}" in cmds
    assert cmds[-1] == "ip link del psbra1b2c3"


def test_link_and_cut_commands():
    assert netns.link_command(PLAN, "worker1", True) == ["ip", "link", "set", "psa1b2c3h3", "down"]
    assert netns.link_command(PLAN, "worker1", False) == ["ip", "link", "set", "psa1b2c3h3", "up"]
    assert netns.cut_command(PLAN, "worker1", "server0", True) == [
        "ip", "-n", "ps-a1b2c3-worker1", "route", "add", "blackhole", "10.77.42.3/32"]
    assert netns.cut_command(PLAN, "worker1", "server0", False)[4] == "del"


def test_a_run_takes_a_subnet_nobody_uses():
    out = "3: eth0    inet 10.0.0.5/24 ...\n7: psbrx    inet 10.77.5.1/24 brd 10.77.5.255 ...\n"
    assert netns.used_subnets(out) == {5}
    used = set(range(1, 250))
    assert netns.new_plan(["scheduler"], used).subnet == 250
    with pytest.raises(netns.Unavailable):
        netns.new_plan(["scheduler"], used | {250})
    plan = netns.new_plan(["scheduler", "server0"], set())
    assert plan.run_id != netns.new_plan(["scheduler", "server0"], set()).run_id   # unique per run
