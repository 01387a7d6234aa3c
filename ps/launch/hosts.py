"""Roles on other machines (``--hosts FILE``): where each role runs, and the ssh command.

A host file names the machines, one per line, with optional settings and roles::

    # ssh target       settings                       roles (optional)
    node1              addr=10.0.0.1                  scheduler
    alice@node2        addr=10.0.0.2 port=7800        server0 worker0
    node3              dir=/srv/ps python=/srv/venv/bin/python   server1:7900 worker1

- the **ssh target** is what ``ssh`` is given (``user@host`` or an ssh config alias);
- ``addr=`` is the address the other roles reach this host at (default: the target's
  host part); ``port=`` the first port its roles bind (default ``DEFAULT_PORT``);
  ``dir=`` the checkout of this repository there and ``python=`` the interpreter
  (default: the launcher's own, i.e. the same paths on every host);
- a **role** is ``scheduler``, ``serverK`` or ``workerW``; the scheduler and the servers
  bind a fixed port, ``ROLE:PORT`` or else the host's ``port=`` plus 0 for the
  scheduler and 1 + K for server K. Roles not named anywhere are dealt out: the
  scheduler to the first host, servers and workers round-robin over all hosts.

Fixed ports make every endpoint known before anything starts: the launcher gives the
servers the scheduler's address and each server an ``--advertise`` address, and needs
no endpoint file (which cannot cross hosts). Each role starts as
``ssh -n -tt TARGET 'cd DIR && exec env K=V... PYTHON -m ps.server ...'``: with a
terminal on the far side, ending the local ssh (the launcher stopping, or dying) hangs
up the remote role. Pure parsing and command building; ``ps.launch.processes`` runs the commands.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, replace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_PORT = 7700              # the scheduler's port on its host; server K gets +1+K
SSH = ["ssh", "-n", "-tt",       # -n: never read the launcher's terminal; -tt: a remote tty,
       "-o", "BatchMode=yes",    # so a dying ssh hangs up the role; no password prompts
       "-o", "ConnectTimeout=10"]
_ROLE = re.compile(r"^(scheduler|server\d+|worker\d+)(?::(\d+))?$")
_SETTINGS = ("addr", "port", "dir", "python")


@dataclass(frozen=True)
class Host:
    target: str                  # what ssh is given
    addr: str                    # how the other roles reach it
    port: int = DEFAULT_PORT
    dir: str = ROOT
    python: str = sys.executable
    roles: tuple[tuple[str, int | None], ...] = ()   # (role, fixed port or None) as written


@dataclass(frozen=True)
class Where:
    """One role's place: the host it runs on and the port it binds (None: a worker)."""
    host: Host
    port: int | None


def parse(text: str) -> list[Host]:
    """The hosts of a host file (ValueError names the line that is wrong)."""
    hosts = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        target, settings, roles = words[0], {}, []
        for word in words[1:]:
            key, eq, value = word.partition("=")
            if eq:
                if key not in _SETTINGS or not value:
                    raise ValueError(f"line {n}: unknown setting {word!r} (want {', '.join(_SETTINGS)})")
                settings[key] = value
                continue
            m = _ROLE.match(word)
            if not m or (m[2] and m[1].startswith("worker")):
                raise ValueError(f"line {n}: {word!r} is not a role (scheduler, serverK[:PORT], workerW)")
            roles.append((m[1], int(m[2]) if m[2] else None))
        try:
            port = int(settings.get("port", DEFAULT_PORT))
        except ValueError:
            raise ValueError(f"line {n}: port= wants a number") from None
        hosts.append(Host(target, settings.get("addr", target.rsplit("@", 1)[-1]), port,
                          settings.get("dir", ROOT), settings.get("python", sys.executable),
                          tuple(roles)))
    if not hosts:
        raise ValueError("no hosts in the file")
    return hosts


def assign(hosts: list[Host], roles: list[str]) -> dict[str, Where]:
    """Place every role of the cluster: as the file says, the rest dealt out."""
    placed: dict[str, Where] = {}
    for host in hosts:
        for role, port in host.roles:
            if role not in roles:
                raise ValueError(f"{role} is not a role of this cluster ({', '.join(roles)})")
            if role in placed:
                raise ValueError(f"{role} is placed twice")
            placed[role] = Where(host, port)
    rest = [r for r in roles if r not in placed]
    for i, role in enumerate(r for r in rest if r != "scheduler"):
        placed[role] = Where(hosts[i % len(hosts)], None)
    if "scheduler" in rest:
        placed["scheduler"] = Where(hosts[0], None)
    for role, where in placed.items():          # fill in the default ports
        if where.port is None and not role.startswith("worker"):
            offset = 0 if role == "scheduler" else 1 + int(role[len("server"):])
            placed[role] = replace(where, port=where.host.port + offset)
    binds = [(w.host.addr, w.port) for w in placed.values() if w.port is not None]
    if len(set(binds)) != len(binds):
        raise ValueError("two roles bind the same address and port")
    return placed


def remote_command(where: Where, cmd: list[str], env: dict[str, str]) -> list[str]:
    """The ssh command line that runs ``cmd`` (``python -m ...``) on the role's host, in
    its checkout, with the variables of ``env`` that the launcher set for roles (those
    that differ from its own environment, and every ``PS_*``; not PYTHONPATH: ``-m``
    run from the checkout finds the packages)."""
    host = where.host
    fwd = {k: v for k, v in env.items() if k != "PYTHONPATH"
           and (k.startswith("PS_") or os.environ.get(k) != v)}
    argv = [host.python, *cmd[1:]]              # cmd[0] is the launcher's interpreter
    script = " ".join(["cd", shlex.quote(host.dir), "&&", "exec", "env",
                       *(shlex.quote(f"{k}={v}") for k, v in sorted(fwd.items())),
                       *(shlex.quote(a) for a in argv)])
    return [*SSH, host.target, script]


class Placement:
    """Roles on the hosts of a host file (for ``ps.launch.processes.Cluster``)."""

    def __init__(self, assignment: dict[str, Where]):
        self.where = assignment

    def command(self, name: str, cmd: list[str], env: dict) -> list[str]:
        return remote_command(self.where[name], cmd, env)

    def bind(self, name: str) -> str:
        return f"tcp://*:{self.where[name].port}"

    def advertise(self, name: str) -> str | None:
        w = self.where[name]
        return None if w.port is None else f"tcp://{w.host.addr}:{w.port}"
