"""Roles on other hosts (--hosts FILE, ps.launch.hosts): the host file, placement, the ssh path.

The host file's format and the placement of roles are pure and checked directly. The
ssh path is run for real with a fake ``ssh`` first on PATH that logs its arguments and
runs the remote command on this machine: the whole cluster then starts through the
code a multi-host launch uses (fixed ports from the host file, no endpoint files,
every role behind ssh), and must give the oracle's parameters.
"""
import os
import shlex
import socket
import sys

import pytest

from cluster import JOBS, assert_params_close, launch, oracle
from ps.launch import hosts

JOB = os.path.join(JOBS, "tiny_mlp.py")
ROLES = ["scheduler", "server0", "server1", "worker0", "worker1"]


# -- the host file -------------------------------------------------------------------------

def test_parse_a_host_file():
    text = """
        # a comment line
        node1  addr=10.0.0.1  scheduler          # trailing comment
        alice@node2 port=7800 server0:7900 worker0
        node3 dir=/srv/ps python=/srv/venv/bin/python
    """
    h1, h2, h3 = hosts.parse(text)
    assert (h1.target, h1.addr, h1.port, h1.roles) == ("node1", "10.0.0.1", hosts.DEFAULT_PORT,
                                                       (("scheduler", None),))
    assert (h2.target, h2.addr, h2.port) == ("alice@node2", "node2", 7800)
    assert h2.roles == (("server0", 7900), ("worker0", None))
    assert (h3.dir, h3.python, h3.roles) == ("/srv/ps", "/srv/venv/bin/python", ())
    assert (h1.dir, h1.python) == (hosts.ROOT, sys.executable)      # same paths as here


@pytest.mark.parametrize("text,words", [
    ("", "no hosts"),
    ("# only a comment\n", "no hosts"),
    ("node1 colour=blue", "line 1"),
    ("node1 addr=", "line 1"),
    ("node1\nnode2 client0", "line 2"),
    ("node1 worker0:7000", "line 1"),            # workers bind nothing
    ("node1 port=abc", "port"),
])
def test_bad_host_files_are_refused_naming_the_line(text, words):
    with pytest.raises(ValueError) as info:
        hosts.parse(text)
    assert words in str(info.value)


def test_roles_not_named_are_dealt_out_round_robin():
    placed = hosts.assign(hosts.parse("a\nb port=8000\n"), ROLES)
    assert {r: (w.host.target, w.port) for r, w in placed.items()} == {
        "scheduler": ("a", 7700), "server0": ("a", 7701), "server1": ("b", 8002),
        "worker0": ("a", None), "worker1": ("b", None)}


def test_named_roles_stay_where_the_file_puts_them():
    placed = hosts.assign(hosts.parse("a server1\nb scheduler:5555 worker1\n"), ROLES)
    assert placed["server1"].host.target == "a" and placed["server1"].port == 7702
    assert (placed["scheduler"].host.target, placed["scheduler"].port) == ("b", 5555)
    assert placed["worker1"].host.target == "b"


@pytest.mark.parametrize("text,words", [
    ("a worker0\nb worker0", "twice"),
    ("a worker7", "not a role of this cluster"),
    ("a scheduler:7000 server0:7000", "same address and port"),
])
def test_bad_placements_are_refused(text, words):
    with pytest.raises(ValueError) as info:
        hosts.assign(hosts.parse(text), ROLES)
    assert words in str(info.value)


def test_the_remote_command():
    placed = hosts.assign(hosts.parse("alice@b addr=10.0.0.2 dir=/srv/it's python=py3"), ROLES)
    where = placed["server0"]
    cmd = hosts.remote_command(where, [sys.executable, "-m", "ps.server", "--bind", "tcp://*:7701"],
                               {**os.environ, "PS_NET_FAULTS": "drop=0.1", "OMP_NUM_THREADS": "3",
                                "PYTHONPATH": "/here"})
    assert cmd[:-2] == hosts.SSH and cmd[-2] == "alice@b"
    assert shlex.split(cmd[-1]) == ["cd", "/srv/it's", "&&", "exec", "env", "OMP_NUM_THREADS=3",
                                    "PS_NET_FAULTS=drop=0.1", "py3", "-m", "ps.server",
                                    "--bind", "tcp://*:7701"]
    place = hosts.Placement(placed)
    assert place.bind("server0") == "tcp://*:7701"
    assert place.advertise("server0") == "tcp://10.0.0.2:7701"
    assert place.advertise("worker0") is None


# -- the whole cluster through ssh -----------------------------------------------------------

FAKE_SSH = """#!/bin/sh
# A stand-in for ssh: log the call, skip the options, run the remote command here.
printf '%s\n' "$*" >> "$FAKE_SSH_LOG"
while [ $# -gt 0 ]; do
  case "$1" in
    -o) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
shift                                   # the host
exec /bin/sh -c "$*"
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_a_cluster_started_through_ssh_trains_like_the_oracle(tmp_path):
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "ssh").write_text(FAKE_SSH)
    (shim / "ssh").chmod(0o755)
    log = tmp_path / "ssh.log"
    sched, s0, s1 = free_ports(3)
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"hostA addr=127.0.0.1 scheduler:{sched} server0:{s0} worker0\n"
                        f"hostB addr=127.0.0.1 server1:{s1} worker1\n")
    run = launch(tmp_path / "out", "--job", JOB, "--steps", "20", "--hosts", str(hostfile),
                 env={"PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "FAKE_SSH_LOG": str(log)})
    assert run.rc == 0, run.stderr[-4000:]
    assert run.summary["ok"]
    calls = log.read_text().splitlines()
    assert len(calls) == 5                                   # every role went through ssh
    assert sum(" hostA " in c for c in calls) == 3 and sum(" hostB " in c for c in calls) == 2
    assert any(f"--bind 'tcp://*:{s1}'" in c and f"--advertise tcp://127.0.0.1:{s1}" in c
               for c in calls)
    assert not any("--endpoint-file" in c for c in calls)  # endpoints known from the file
    assert_params_close(run.params, oracle(JOB, 20), rtol=1e-5)


def test_process_faults_are_refused_with_hosts(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a\n")
    run = launch(tmp_path / "out", "--job", JOB, "--hosts", str(hostfile),
                 "--inject", "kill:worker1@step=3", timeout_s=60)
    assert run.rc == 2 and "not with --hosts" in run.stderr
