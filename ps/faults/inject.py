"""Fault injection for the launcher: ``--inject SPEC``, repeatable.

A spec names an action, a target role and a trigger::

    kill:worker1@step=20            SIGKILL worker 1 once the run reaches step 20
    kill:worker1@time=3s            ... 3 seconds after training starts
    pause:worker1@step=10,for=5s    SIGSTOP, then SIGCONT 5 s later
    kill:server0@step=30            a server (the run then fails unless it can recover)
    drop:0.02  dup:0.02  delay:5ms  message faults in every role's transport (ps.faults.messages)

Link faults need ``--netns`` (every role in its own network namespace, ``ps.launch.netns``)::

    partition:worker1@step=10,for=4s         worker 1's link down (both ways) for 4 s, then up
    cut:worker1->server0@step=10,for=4s      one way: worker 1's packets to server 0 are
                                             dropped (a blackhole route in worker 1's
                                             namespace); server 0 -> worker 1 still flows
    flap:worker1@step=5,for=6s,period=1s     for 6 s, the link is down for the first half
                                             of every period and up for the second; then up

A link fault's target is any role (``scheduler``, ``serverK``, ``workerW``); a cut's
two ends must differ. ``for=`` is required: a link is always restored.

Steps are the scheduler's progress (STATUS ``step``: the highest step any worker
reported), so a trigger fires between that step's reports, not at an exact
instruction; tests that need a fault at a precise point use the worker's
``--crash-at`` hook instead. Pure parsing plus a small scheduler of actions; the
launcher sends the signals and sets the links (``ps.launch.netns.LinkInjector``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_SPEC = re.compile(r"^(?P<action>kill|pause):(?P<target>(worker|server)\d+|scheduler)"
                   r"@(?P<kind>step|time)=(?P<at>\d+(\.\d+)?)s?(,for=(?P<for>\d+(\.\d+)?)s)?$")


@dataclass
class Fault:
    action: str                  # kill | pause
    target: str                  # worker1, server0, scheduler
    trigger: str                 # step | time
    at: float                    # step number or seconds since training started
    duration_s: float = 0.0      # pause length
    fired_at_s: float | None = None
    resumed: bool = False
    spec: str = field(default="", repr=False)

    def due(self, step: int, elapsed_s: float) -> bool:
        return self.fired_at_s is None and (
            step >= self.at if self.trigger == "step" else elapsed_s >= self.at)


def parse(spec: str) -> Fault:
    m = _SPEC.match(spec.strip())
    if not m:
        raise ValueError(f"bad --inject {spec!r}: want e.g. kill:worker1@step=20, "
                         "kill:worker0@time=3s or pause:server0@step=10,for=5s")
    if m["action"] == "pause" and not m["for"]:
        raise ValueError(f"--inject {spec!r}: a pause needs ,for=Ns")
    return Fault(m["action"], m["target"], m["kind"], float(m["at"]),
                 float(m["for"] or 0.0), spec=spec.strip())


_ROLE = r"(?:(?:worker|server)\d+|scheduler)"
_LINK = re.compile(rf"^(?P<action>partition|cut|flap):(?P<target>{_ROLE})(?:->(?P<dst>{_ROLE}))?"
                   r"@(?P<kind>step|time)=(?P<at>\d+(\.\d+)?)s?,for=(?P<for>\d+(\.\d+)?)s"
                   r"(,period=(?P<period>\d+(\.\d+)?)s)?$")
LINK_ACTIONS = ("partition:", "cut:", "flap:")


@dataclass
class LinkFault:
    """A link fault and its state: when it fired, whether the link is down now, when it
    healed (all in seconds since training started, like ``Fault.fired_at_s``)."""
    action: str                  # partition | cut | flap
    target: str                  # the role whose link goes down; a cut's sender
    trigger: str                 # step | time
    at: float
    duration_s: float
    period_s: float = 0.0        # flap only
    dst: str | None = None       # cut only: the receiver the sender can no longer reach
    fired_at_s: float | None = None
    fired_mono: float = 0.0      # time.monotonic() at firing: heals keep time across restarts
    healed_at_s: float | None = None
    down: bool = False           # the state the launcher last set
    spec: str = field(default="", repr=False)
    cuts: list = field(default_factory=list, repr=False)   # [down, up] (monotonic) each time
                                                           # the link went down (up: None yet)

    def due(self, step: int, elapsed_s: float) -> bool:
        return self.fired_at_s is None and (
            step >= self.at if self.trigger == "step" else elapsed_s >= self.at)

    def wanted_down(self, since_fired_s: float) -> bool:
        """Whether the link should be down this long after firing."""
        if since_fired_s >= self.duration_s:
            return False
        if self.action == "flap":
            return since_fired_s % self.period_s < self.period_s / 2
        return True

    def update(self, step: int | None, train_s: float | None, now: float) -> bool | None:
        """Advance the fault to time ``now`` (monotonic). ``step``/``train_s`` are the run's
        progress, None outside training (a fault then only heals, never fires). Returns
        the link state to set (True: down), or None when nothing changes."""
        if self.healed_at_s is not None:
            return None
        if self.fired_at_s is None:
            if step is None or train_s is None or not self.due(step, train_s):
                return None
            self.fired_at_s, self.fired_mono = round(train_s, 3), now
        since = now - self.fired_mono
        down = self.wanted_down(since)
        if not down and since >= self.duration_s:
            self.healed_at_s = round(self.fired_at_s + since, 3)
        if down == self.down:
            return None
        self.down = down
        if down:
            self.cuts.append([now, None])
        else:
            self.cuts[-1][1] = now
        return down


def parse_link(spec: str) -> LinkFault:
    """``partition:ROLE@...,for=Ts``, ``cut:SRC->DST@...,for=Ts``, ``flap:ROLE@...,for=Ts,period=Ps``."""
    m = _LINK.match(spec.strip())
    if not m:
        raise ValueError(f"bad --inject {spec!r}: want e.g. partition:worker1@step=10,for=4s, "
                         "cut:worker1->server0@step=10,for=4s or flap:worker1@step=5,for=6s,period=1s")
    action, dst, period = m["action"], m["dst"], float(m["period"] or 0.0)
    if (action == "cut") != (dst is not None):
        raise ValueError(f"--inject {spec!r}: only a cut names a receiver (cut:SRC->DST)")
    if action == "cut" and dst == m["target"]:
        raise ValueError(f"--inject {spec!r}: a cut needs two different roles")
    if (action == "flap") != (period > 0):
        raise ValueError(f"--inject {spec!r}: a flap, and only a flap, needs ,period=Ps (> 0)")
    if float(m["for"]) <= 0:
        raise ValueError(f"--inject {spec!r}: for= must be > 0")
    return LinkFault(action, m["target"], m["kind"], float(m["at"]), float(m["for"]), period, dst,
                     spec=spec.strip())


_NET = re.compile(r"^(?P<what>drop|dup):(?P<p>0?\.\d+|0|1(\.0+)?)$|^delay:(?P<ms>\d+(\.\d+)?)ms$")


def parse_net(spec: str) -> tuple[str, float] | None:
    """``drop:0.02`` -> ("drop", 0.02); ``delay:5ms`` -> ("delay_ms", 5.0); else None."""
    m = _NET.match(spec.strip())
    if not m:
        return None
    return ("delay_ms", float(m["ms"])) if m["ms"] else (m["what"], float(m["p"]))


def split(specs: list[str]) -> tuple[list[Fault], dict[str, float]]:
    """Process faults and message faults, each spec checked (ValueError names a bad one).
    Link faults are left out: ``split_links`` takes them."""
    faults, net = [], {}
    for spec in specs:
        message_fault = parse_net(spec)
        if message_fault:
            net[message_fault[0]] = message_fault[1]
        elif not spec.strip().startswith(LINK_ACTIONS):
            faults.append(parse(spec))
    return faults, net


def split_links(specs: list[str]) -> list[LinkFault]:
    """The link faults among the specs, each checked (ValueError names a bad one)."""
    return [parse_link(s) for s in specs if s.strip().startswith(LINK_ACTIONS)]
