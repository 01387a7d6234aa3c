"""Network namespaces for a local cluster (``--netns``): every role on its own address.

Each role runs in its own network namespace, joined to the others by a virtual bridge
in the root namespace, so the roles talk over real TCP addresses (never 127.0.0.1) and
the network between them can be cut: this is how the launcher injects link faults
(``partition``, ``cut``, ``flap``; ``ps.faults.inject``)::

    root namespace:  bridge psbr<id>  10.77.N.1/24    (the launcher reaches the scheduler here)
                       |-- veth ps<id>h0 <-> eth0 in ps-<id>-scheduler  10.77.N.2
                       |-- veth ps<id>h1 <-> eth0 in ps-<id>-server0    10.77.N.3
                       '-- ...                          ps-<id>-worker1    10.77.N.k

``--link-mbps N`` (``--link-delay-ms D``) shapes every role's link both ways with the
kernel's token bucket (``tc ... tbf``; netem's delay under it): its namespace's ``eth0``
limits what it sends, the host-side veth what it receives. Two roles talking cross two
links, so a transfer gets N Mbit/s and 2D of one-way delay.

A partition takes the role's host-side veth down (both directions stop; TCP
connections stay open and retransmit once it is up again); a one-way cut adds a
blackhole route to the receiver's address in the sender's namespace.

``Plan`` and the ``*_commands`` functions only build ``ip`` command lines (pure, tested
without root); ``Network`` runs them, and ``LinkInjector`` drives the link faults from
the launcher's loop. The invariant: everything a run creates carries its unique run id
and is removed when the run ends (``Network.down``, also on Ctrl-C and failure); what
a killed launcher left behind is found by its record in ``RUN_DIR`` and removed by the
next run (or ``python -m ps.launch.netns --clean``).
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

SUBNET = "10.77"                 # runs use 10.77.N.0/24, N free in the root namespace
RUN_DIR = "/run/ps-netns"        # one file per live run: its launcher's pid (stale ones are reaped)
PREFIX = "ps-"                   # namespace names: ps-<id>-<role>
IP_TIMEOUT_S = 10.0              # an `ip` command that takes longer than this has failed


class Unavailable(RuntimeError):
    """Namespaces cannot be used here (not root, no `ip`, or no netns support)."""


@dataclass(frozen=True)
class Plan:
    """The names and addresses of one run's network (pure: nothing is created)."""
    run_id: str                  # a few hex digits, unique per run (interface names <= 15 chars)
    subnet: int                  # N of 10.77.N.0/24
    roles: tuple[str, ...]       # scheduler, server0.., worker0..: addresses in this order

    @property
    def bridge(self) -> str:
        return f"psbr{self.run_id}"

    @property
    def gateway(self) -> str:
        return f"{SUBNET}.{self.subnet}.1"

    def namespace(self, role: str) -> str:
        return f"{PREFIX}{self.run_id}-{role}"

    def veth(self, role: str) -> str:
        return f"ps{self.run_id}h{self.roles.index(role)}"

    def address(self, role: str) -> str:
        return f"{SUBNET}.{self.subnet}.{2 + self.roles.index(role)}"

    def exec_prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(role)]


def new_plan(roles: list[str], used_subnets: set[int], run_id: str | None = None) -> Plan:
    """A plan on a subnet no other run uses (starting at a pid-dependent place, so two
    launchers starting together are unlikely to pick the same one)."""
    if len(roles) > 250:
        raise ValueError(f"--netns gives each role an address in a /24: {len(roles)} roles are too many")
    start = os.getpid() % 250
    for i in range(250):
        n = 1 + (start + i) % 250
        if n not in used_subnets:
            return Plan(run_id or secrets.token_hex(3), n, tuple(roles))
    raise Unavailable(f"every subnet {SUBNET}.1-250.0/24 is in use")


def setup_commands(plan: Plan) -> list[list[str]]:
    """The bridge, then per role: its namespace, a veth pair into it, its address, lo up."""
    cmds = [["ip", "link", "add", plan.bridge, "type", "bridge"],
            ["ip", "addr", "add", f"{plan.gateway}/24", "dev", plan.bridge],
            ["ip", "link", "set", plan.bridge, "up"]]
    for role in plan.roles:
        ns, veth = plan.namespace(role), plan.veth(role)
        cmds += [["ip", "netns", "add", ns],
                 ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
                 ["ip", "link", "set", veth, "master", plan.bridge, "up"],
                 ["ip", "-n", ns, "addr", "add", f"{plan.address(role)}/24", "dev", "eth0"],
                 ["ip", "-n", ns, "link", "set", "eth0", "up"],
                 ["ip", "-n", ns, "link", "set", "lo", "up"]]
    return cmds


SHAPE_BURST_BYTES = 64 * 1024    # tbf's bucket: a few 9 KB jumbo-free frames; small enough
                                 # that a burst cannot outrun the rate by much
SHAPE_LATENCY_MS = 200           # tbf's queue: how long a packet may wait before it is dropped


def shape_commands(plan: Plan, mbps: float, delay_ms: float = 0.0) -> list[list[str]]:
    """Per role, both directions: a token bucket of ``mbps`` (and a ``delay_ms`` netem
    delay above it) on its namespace's eth0 (what it sends) and on its host-side veth
    (what it receives)."""
    cmds = []
    for role in plan.roles:
        for dev in (["ip", "netns", "exec", plan.namespace(role), "tc"], "eth0"), (["tc"], plan.veth(role)):
            tc, name = dev
            tbf = ["tbf", "rate", f"{mbps}mbit", "burst", str(SHAPE_BURST_BYTES),
                   "latency", f"{SHAPE_LATENCY_MS}ms"]
            if delay_ms:
                cmds += [[*tc, "qdisc", "add", "dev", name, "root", "handle", "1:", "netem",
                          "delay", f"{delay_ms}ms"],
                         [*tc, "qdisc", "add", "dev", name, "parent", "1:1", "handle", "10:", *tbf]]
            else:
                cmds.append([*tc, "qdisc", "add", "dev", name, "root", *tbf])
    return cmds


def teardown_commands(plan: Plan) -> list[list[str]]:
    """Deleting the host end of a veth deletes both ends at once (deleting a namespace
    would too, but asynchronously); then the namespaces, then the bridge."""
    return ([["ip", "link", "del", plan.veth(r)] for r in plan.roles]
            + [["ip", "netns", "del", plan.namespace(r)] for r in plan.roles]
            + [["ip", "link", "del", plan.bridge]])


def link_command(plan: Plan, role: str, down: bool) -> list[str]:
    """A partition: the role's host-side veth down (nothing in or out), or up again."""
    return ["ip", "link", "set", plan.veth(role), "down" if down else "up"]


def cut_command(plan: Plan, src: str, dst: str, on: bool) -> list[str]:
    """A one-way cut: src's packets to dst go nowhere; dst's packets to src still arrive."""
    return ["ip", "-n", plan.namespace(src), "route", "add" if on else "del",
            "blackhole", f"{plan.address(dst)}/32"]


def used_subnets(ip_addr_output: str) -> set[int]:
    """N of every 10.77.N.x address in `ip -4 -o addr` output."""
    used = set()
    for word in ip_addr_output.split():
        if word.startswith(SUBNET + "."):
            parts = word.split("/")[0].split(".")
            if len(parts) == 4 and parts[2].isdigit():
                used.add(int(parts[2]))
    return used


# -- the thin executor ----------------------------------------------------------------

def run(cmd: list[str], check: bool = True) -> str:
    """Run one `ip` command; a failure raises RuntimeError with the command and its error."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if check:
            raise RuntimeError(f"{' '.join(cmd)}: {exc}") from exc
        return ""
    if out.returncode != 0 and check:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip() or 'exit status ' + str(out.returncode)}")
    return out.stdout


def check_available() -> None:
    """Raise Unavailable with the reason, unless namespaces can be created here: root,
    iproute2's `ip`, and a namespace actually created and deleted."""
    if os.geteuid() != 0:
        raise Unavailable("--netns needs root (it creates network namespaces, a bridge and links)")
    if shutil.which("ip") is None:
        raise Unavailable("--netns needs iproute2's `ip` command")
    probe = f"{PREFIX}probe-{secrets.token_hex(3)}"
    try:
        run(["ip", "netns", "add", probe])
    except RuntimeError as exc:
        raise Unavailable(f"--netns: network namespaces are not supported here ({exc})") from exc
    run(["ip", "netns", "del", probe], check=False)


def reap_stale() -> list[str]:
    """Remove what runs whose launcher is gone left behind (namespaces, bridge, record);
    return their ids."""
    if not os.path.isdir(RUN_DIR):
        return []
    reaped = []
    namespaces = [line.split()[0] for line in run(["ip", "netns", "list"], check=False).splitlines() if line]
    for run_id in os.listdir(RUN_DIR):
        try:
            with open(os.path.join(RUN_DIR, run_id)) as f:
                os.kill(int(f.read().split()[0]), 0)
            continue                                  # its launcher is alive
        except (OSError, ValueError, IndexError):
            pass
        for ns in namespaces:
            if ns.startswith(f"{PREFIX}{run_id}-"):
                run(["ip", "netns", "del", ns], check=False)
        run(["ip", "link", "del", f"psbr{run_id}"], check=False)
        os.remove(os.path.join(RUN_DIR, run_id))
        reaped.append(run_id)
    return reaped


class Network:
    """One run's namespaces and bridge: ``up`` creates them, ``down`` removes them."""

    def __init__(self, roles: list[str], link_mbps: float | None = None, link_delay_ms: float = 0.0):
        check_available()
        reap_stale()
        self.link_mbps, self.link_delay_ms = link_mbps, link_delay_ms
        self.plan = new_plan(roles, used_subnets(run(["ip", "-4", "-o", "addr"])))
        self.record = os.path.join(RUN_DIR, self.plan.run_id)
        self.created = False

    def up(self) -> None:
        os.makedirs(RUN_DIR, exist_ok=True)
        with open(self.record, "w") as f:       # written first: a crash mid-setup is reaped too
            f.write(f"{os.getpid()} {self.plan.subnet}\n")
        self.created = True
        for cmd in setup_commands(self.plan):
            run(cmd)
        if self.link_mbps:                      # the veths exist now: shape them
            for cmd in shape_commands(self.plan, self.link_mbps, self.link_delay_ms):
                run(cmd)

    def down(self) -> None:
        if not self.created:
            return
        for cmd in teardown_commands(self.plan):
            run(cmd, check=False)                # best effort: a half-built network too
        if os.path.exists(self.record):
            os.remove(self.record)
        self.created = False

    def set_link(self, fault, down: bool) -> None:
        """Apply a link fault's new state (``ps.faults.inject.LinkFault``)."""
        if fault.action == "cut":
            run(cut_command(self.plan, fault.target, fault.dst, down))
        else:
            run(link_command(self.plan, fault.target, down))


class Placement:
    """Each role in its namespace, bound to its own address (for ``ps.launch.processes.Cluster``)."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def command(self, name: str, cmd: list[str], env: dict) -> list[str]:
        # `ip netns exec` execs the command in place: the pid the launcher holds (and
        # signals, for kill and pause faults) is the role's own.
        return self.plan.exec_prefix(name) + cmd

    def bind(self, name: str) -> str:
        return f"tcp://{self.plan.address(name)}:*"

    def advertise(self, name: str) -> str | None:
        return None


class LinkInjector:
    """Fires and heals the link faults from the launcher's loop, and keeps the run's
    progress so that the summary can say when each fault's effect ended."""

    def __init__(self, network: Network | None, faults: list):
        self.network = network
        self.faults = faults
        self.progress: list[tuple[float, int]] = []   # (monotonic time, step) at each change

    def tick(self, step: int | None, train_s: float | None) -> None:
        now = time.monotonic()
        if step is not None and (not self.progress or self.progress[-1][1] != step):
            self.progress.append((now, step))
        for fault in self.faults:
            down = fault.update(step, train_s, now)
            if down is None:
                continue
            self.network.set_link(fault, down)
            if fault.action != "flap" or fault.healed_at_s is not None or fault.fired_mono == now:
                what = "injected" if down else "healed"
                print(f"{what} {fault.spec} at {fault.fired_at_s + now - fault.fired_mono:.2f} s"
                      + (f" (step {step})" if step is not None else ""), file=sys.stderr)

    def heal_all(self) -> None:
        """Restore every link still down (the run is over: nobody must stay cut off)."""
        now = time.monotonic()
        for fault in self.faults:
            if fault.fired_at_s is not None and fault.healed_at_s is None:
                fault.healed_at_s = round(fault.fired_at_s + now - fault.fired_mono, 3)
                if fault.down:
                    fault.down = False
                    self.network.set_link(fault, False)

    def records(self, deaths_mono: dict[str, float]) -> list[dict]:
        """Per fault, for summary.json: ``fired_at_s``, ``healed_at_s``, ``detected_at_s`` (the
        death verdict of its target, if one followed), ``steps_during`` (how far the run
        got from firing to healing), ``steps_while_down`` (the same for each time the link
        went down: a flap cuts it several times) and ``recovery_s`` (from firing to the
        first step the run completed after the fault's end: the link restored, or the
        verdict that dealt the target's tasks again, whichever came first)."""
        out = []
        for f in self.faults:
            rec = {"spec": f.spec, "fired_at_s": f.fired_at_s, "healed_at_s": f.healed_at_s,
                   "detected_at_s": None, "steps_during": None, "steps_while_down": [],
                   "recovery_s": None}
            if f.fired_at_s is not None:
                base = f.fired_mono - f.fired_at_s            # monotonic time of training start
                if f.healed_at_s is not None:
                    rec["steps_during"] = (self._step_at(base + f.healed_at_s)
                                           - self._step_at(f.fired_mono))
                    rec["steps_while_down"] = [   # a cut still open at the end: up when healed
                        self._step_at(base + f.healed_at_s if up is None else up)
                        - self._step_at(down) for down, up in f.cuts]
                detected = deaths_mono.get(f.target)
                if detected is not None and detected >= f.fired_mono:
                    rec["detected_at_s"] = round(detected - base, 3)
                ends = [t for t in (detected if rec["detected_at_s"] is not None else None,
                                    None if f.healed_at_s is None else base + f.healed_at_s)
                        if t is not None]
                after = [t for t, _ in self.progress if ends and t > min(ends)]
                if after:
                    rec["recovery_s"] = round(after[0] - f.fired_mono, 3)
            out.append(rec)
        return out

    def _step_at(self, t: float) -> int:
        return max((step for when, step in self.progress if when <= t), default=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ps.launch.netns",
                                description="Remove what --netns runs whose launcher died left behind.")
    p.add_argument("--clean", action="store_true", help="remove stale namespaces and bridges")
    args = p.parse_args(argv)
    if not args.clean:
        p.print_help()
        return 0
    try:
        check_available()
    except Unavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"removed: {' '.join(reap_stale()) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
