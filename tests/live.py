"""A cluster training in the background while a test attacks one of its servers.

``Background`` starts ``ps.launch`` in its own process group, waits until the run
is training (server 0 has applied a step), gives the test sockets to the roles,
and at the end waits for the honest run to finish. Whatever happens, the group is
killed and every socket closed before the test returns. A ``Probe`` is a test's socket
that also sees its connection's handshake, to tell "heard and said nothing" from
"nobody there". ``start_role`` starts one
role alone (a scheduler, a server), for a test that plays the others itself;
``BareScheduler`` is a scheduler and one server whose workers the test plays.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from cluster import ROOT, kill_group

sys.path.insert(0, ROOT)
from ps.wire.client import Peer  # noqa: E402
from ps.wire.protocol import Kind, decode, encode  # noqa: E402
from worker.job import load_job  # noqa: E402


def shard_ranges(job_path: str, servers: int) -> list[tuple[int, int]]:
    """[lo, hi) of each shard: the scheduler's cut of the flat parameter vector."""
    model, _ = load_job(job_path).build(0)
    total = sum(p.numel() for p in model.parameters())
    return [(k * total // servers, (k + 1) * total // servers) for k in range(servers)]


class Background:
    def __init__(self, out, *args: str, env: dict | None = None):
        self.out = out
        cmd = [sys.executable, "-m", "ps.launch", "--quiet", "--out", str(out), "--timeout-s", "30",
               "--device", "cpu", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                                     start_new_session=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.ctx = zmq.Context()
        self.roles: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        kill_group(self.proc)
        self.proc.communicate()
        self.ctx.destroy(linger=0)

    def wait_roles(self, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        path = os.path.join(self.out, "cluster.json")
        while not os.path.exists(path):
            assert self.proc.poll() is None, self.proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the cluster did not start"
            time.sleep(0.05)
        self.roles = json.load(open(path))["roles"]
        return self.roles

    def socket(self, role: str, setup=None) -> zmq.Socket:
        """A DEALER connected to a role; ``setup(sock)`` may make it a CURVE client first."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        if setup:
            setup(sock)
        sock.connect(self.roles[role]["endpoint"])
        return sock

    def probe(self, role: str, setup=None) -> Probe:
        """A ``Probe`` of a role; ``setup(sock)`` may make it a CURVE client first."""
        return Probe(self.ctx, self.roles[role]["endpoint"], setup)

    def wait_training(self, sock: zmq.Socket, min_version: int = 2, timeout_s: float = 30.0) -> dict:
        """Ask a server for its stats until it has applied ``min_version`` steps."""
        deadline = time.monotonic() + timeout_s
        while True:     # a server answers once the cluster has formed (workers import torch)
            stats = ask(sock, [encode("stats", 1)], timeout_s=max(1.0, deadline - time.monotonic()))
            if stats.get("version", 0) >= min_version:
                return stats
            assert time.monotonic() < deadline, f"no training progress: {stats}"
            time.sleep(0.05)

    def alive(self, role: str) -> bool:
        try:
            os.kill(self.roles[role]["pid"], 0)
            return True
        except ProcessLookupError:
            return False

    def finish(self, timeout_s: float = 120.0) -> tuple[int, str]:
        try:
            _, stderr = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            raise AssertionError(f"the honest run did not finish in {timeout_s} s") from None
        return self.proc.returncode, stderr


def ask(sock: zmq.Socket, frames: list, timeout_s: float = 5.0) -> dict:
    """Send one request and return the decoded header of its reply."""
    sock.send_multipart(frames)
    if not sock.poll(int(timeout_s * 1000)):
        raise AssertionError(f"no reply to {bytes(frames[0][:60])!r}")
    return decode(sock.recv_multipart()[0])


HANDSHAKE_S = 5.0               # how long a Probe waits for its connection's handshake
HANDSHAKE_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}


class Probe:
    """A DEALER to one role that also watches its own connection (ZeroMQ's socket
    monitor), so that a test can tell a peer that heard a request and said nothing from
    no peer at all: ``outcome`` says which, and ``dropped`` whether the peer closed the
    connection after its handshake (libzmq does, on a frame over ZMQ_MAXMSGSIZE)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, setup=None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if setup:
            setup(self.sock)
        self.monitor = self.sock.get_monitor_socket()     # before connect: every event
        self.events: list[int] = []                       # zmq.EVENT_* in order
        self.sock.connect(endpoint)

    def _watch(self, until: set, wait_s: float) -> bool:
        """Read events for up to ``wait_s``, stopping at one in ``until``; True if one came."""
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0 and self.monitor.poll(int(left * 1000)):
            self.events.append(recv_monitor_message(self.monitor)["event"])
            if self.events[-1] in until:
                return True
        return False

    def outcome(self, frames: list, wait_s: float = 0.75) -> str:
        """Send one request and say what became of it: "answered"; "ignored" (the peer
        completed the handshake, the request went out to it, and no reply came within
        ``wait_s``); "refused" (the peer failed the handshake, e.g. a CURVE server
        refusing a plaintext client or a key not on its list: nobody could hear it); or
        "no peer" (no handshake completed within HANDSHAKE_S)."""
        ends = {zmq.EVENT_HANDSHAKE_SUCCEEDED} | HANDSHAKE_FAILED
        if not any(e in ends for e in self.events) and not self._watch(ends, HANDSHAKE_S):
            return "no peer"
        if [e for e in self.events if e in ends][-1] in HANDSHAKE_FAILED:
            return "refused"
        self.sock.send_multipart(frames)
        return "answered" if self.sock.poll(int(wait_s * 1000)) else "ignored"

    def dropped(self, wait_s: float = HANDSHAKE_S) -> bool:
        """Did the peer close the connection after the handshake succeeded?"""
        after = self.events[self.events.index(zmq.EVENT_HANDSHAKE_SUCCEEDED) + 1:] \
            if zmq.EVENT_HANDSHAKE_SUCCEEDED in self.events else []
        return zmq.EVENT_DISCONNECTED in after or self._watch({zmq.EVENT_DISCONNECTED}, wait_s)

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


def start_role(argv: list[str], endpoint_file: str) -> tuple[subprocess.Popen, str]:
    """``python -m ARGV`` on a free local port, in a process group of its own (the test
    ends it with ``kill_group``); returns it and the endpoint it bound. A role that does
    not publish its endpoint within 20 s is killed here, and the test fails."""
    proc = subprocess.Popen([sys.executable, "-m", *argv, "--bind", "tcp://127.0.0.1:*",
                             "--timeout-s", "30", "--endpoint-file", endpoint_file],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 20
    try:
        while not os.path.exists(endpoint_file):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{argv[0]} published no endpoint (exit status "
                                     f"{proc.poll()})")
            time.sleep(0.02)
        with open(endpoint_file) as f:
            return proc, f.read().strip()
    except BaseException:
        kill_group(proc)
        proc.wait(10)
        raise


class BareScheduler:
    """A real scheduler and one real server; the test plays every worker (``register``)
    and sees the scheduler's answers as they are. A context manager: both roles end, and
    the sockets close, when it exits."""

    def __init__(self, tmp_path, workers: int, steps: int, tasks_per_step: int | None = None,
                 dead_after_s: float = 30, out: bool = False):
        """``tasks_per_step`` None: the adaptive grain; ``out``: summary.json in tmp_path."""
        self.tmp, self.workers = tmp_path, workers
        self.flags = ["--servers", "1", "--workers", str(workers), "--steps", str(steps),
                      "--dead-after-s", str(dead_after_s)]
        self.flags += ["--tasks-per-step", str(tasks_per_step)] if tasks_per_step else []
        self.flags += ["--out", str(tmp_path)] if out else []
        self.ctx, self.procs = zmq.Context(), []

    def __enter__(self) -> "BareScheduler":
        try:
            self.proc, self.endpoint = start_role(["ps.scheduler", *self.flags],
                                                  str(self.tmp / "scheduler"))
            self.procs.append(self.proc)
            self.procs.append(start_role(["ps.server", "--scheduler", self.endpoint,
                                          "--shard", "0"], str(self.tmp / "server"))[0])
        except BaseException:
            self.__exit__()
            raise
        return self

    def register(self, samples: int) -> list[tuple[Peer, int]]:
        """Register every worker at once (the cluster forms once all have), for a model of
        4 floats and ``samples`` samples in batches of 4: a Peer and incarnation each."""
        peers = [Peer(self.ctx, self.endpoint, f"scheduler{w}") for w in range(self.workers)]
        rids = [p.send(Kind.REGISTER, role="worker", worker=w, layout=[["w", [4]]],
                       dataset_size=samples, batch_size=4, shuffle=False,
                       optimizer={"name": "sgd", "lr": 0.1}, epochs=None, seed=0)
                for w, p in enumerate(peers)]
        return [(p, p.recv(rid, 20)[0]["inc"]) for p, rid in zip(peers, rids)]

    def __exit__(self, *exc) -> None:
        self.ctx.destroy(linger=0)
        for proc in self.procs:
            kill_group(proc)
            proc.wait(10)

