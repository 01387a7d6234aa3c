"""Fault injection for the launcher: ``--inject SPEC``, repeatable.

A spec names an action, a target role and a trigger::

    kill:worker1@step=20            SIGKILL worker 1 once the run reaches step 20
    kill:worker1@time=3s            ... 3 seconds after training starts
    pause:worker1@step=10,for=5s    SIGSTOP, then SIGCONT 5 s later
    kill:server0@step=30            a server (the run then fails unless it can recover)
    drop:0.02  dup:0.02  delay:5ms  message faults in every role's transport (ps.netfaults)

Steps are the scheduler's progress (STATUS ``step``: the highest step any worker
reported), so a trigger fires between that step's reports, not at an exact
instruction; tests that need a fault at a precise point use the worker's
``--crash-at`` hook instead. Pure parsing plus a small scheduler of actions; the
launcher sends the signals.
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


_NET = re.compile(r"^(?P<what>drop|dup):(?P<p>0?\.\d+|0|1(\.0+)?)$|^delay:(?P<ms>\d+(\.\d+)?)ms$")


def parse_net(spec: str) -> tuple[str, float] | None:
    """``drop:0.02`` -> ("drop", 0.02); ``delay:5ms`` -> ("delay_ms", 5.0); else None."""
    m = _NET.match(spec.strip())
    if not m:
        return None
    return ("delay_ms", float(m["ms"])) if m["ms"] else (m["what"], float(m["p"]))


def split(specs: list[str]) -> tuple[list[Fault], dict[str, float]]:
    """Process faults and message faults, each spec checked (ValueError names a bad one)."""
    faults, net = [], {}
    for spec in specs:
        message_fault = parse_net(spec)
        if message_fault:
            net[message_fault[0]] = message_fault[1]
        else:
            faults.append(parse(spec))
    return faults, net
