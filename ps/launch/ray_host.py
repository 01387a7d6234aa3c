"""A role's process on a node of a Ray cluster, and how the launcher sees it
(``ps.launch.ray_engine`` places them).

``RoleHost`` is a Ray actor that owns one role's process on its node: it starts the
process (this node's interpreter, the launcher's environment on top of the node's), says
whether it still runs, signals it, hands back the endpoint file the role published and
the files it wrote in its staging folder. ``RayProcess`` is the launcher's handle on
it, shaped as a ``subprocess.Popen`` (poll, wait, signals, returncode), so
``ps.launch.processes.Cluster`` needs no second code path. A host that cannot be reached
(its node is gone) reads as a process killed by SIGKILL: its process did get SIGKILL,
from ``PR_SET_PDEATHSIG`` when the host died.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CALL_S = 10.0                    # the deadline of one call to a host
LOST = -signal.SIGKILL           # the status of a role whose host (or node) is gone
NODE_OWN_ENV = ("PATH", "HOME", "PWD", "OLDPWD", "SHLVL", "_", "HOSTNAME", "TMPDIR", "USER",
            "LOGNAME", "SHELL", "TERM", "CUDA_VISIBLE_DEVICES")   # the node's own, not ours


class RoleHost:
    """A Ray actor that owns one role's process on its node (one process per host)."""

    def __init__(self, name: str, staging: bool):
        import ray
        self.name = name
        self.node = ray.get_runtime_context().get_node_id()
        self.address = ray.util.get_node_ip_address()
        self.staging = None
        if staging:       # a folder of this node's own for the role's outputs
            import tempfile
            self.staging = os.path.join(tempfile.gettempdir(), "ps-ray",
                                        f"{name}-{uuid.uuid4().hex[:8]}")
            os.makedirs(self.staging)
        self.proc: subprocess.Popen | None = None

    def info(self) -> dict:
        return {"node": self.node, "address": self.address, "staging": self.staging}

    def start(self, cmd: list[str], env: dict) -> int:
        """Run ``cmd`` here: this node's interpreter, the launcher's variables on top of
        this node's own (but not those that describe the launcher's machine)."""
        own = dict(os.environ)
        own.update({k: v for k, v in env.items() if k not in NODE_OWN_ENV and not k.startswith("RAY_")})
        own["PYTHONPATH"] = ROOT + os.pathsep + own.get("PYTHONPATH", "")
        from ps.launch.processes import die_with_parent     # this node's process
        self.proc = subprocess.Popen([sys.executable, *cmd[1:]], cwd=ROOT, env=own,
                                     preexec_fn=die_with_parent)
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def take(self, path: str) -> str | None:
        """A file's text on this node, removed once read (None while it does not exist):
        the endpoint the role published."""
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        os.remove(path)
        return text

    def sees(self, path: str, token: str) -> bool:
        """Does this node read ``token`` at ``path`` (written on the launcher's node)?"""
        try:
            with open(path) as f:
                return f.read() == token
        except OSError:
            return False

    def discard(self) -> None:
        """Remove the staging folder (its files were collected, or are not wanted)."""
        if self.staging:
            shutil.rmtree(self.staging, ignore_errors=True)

    def collect(self) -> dict[str, bytes]:
        """Every file the role wrote in its staging folder, by relative path."""
        files = {}
        for folder, _, names in os.walk(self.staging or ""):
            for n in names:
                if not n.startswith(".") and not n.endswith(".tmp"):
                    path = os.path.join(folder, n)
                    with open(path, "rb") as f:
                        files[os.path.relpath(path, self.staging)] = f.read()
        return files


class RayProcess:
    """A role's process on some node, seen through its host as a ``subprocess.Popen``
    is (poll, wait, signals, returncode), so ``ps.launch.processes.Cluster`` needs no
    second code path. A host that cannot be reached (its node is gone) reads as a
    process killed by SIGKILL."""

    def __init__(self, ray, host, pid: int, info: dict):
        self.ray, self.host, self.pid, self.info = ray, host, pid, info
        self.returncode: int | None = None

    def _call(self, method: str, *args):
        try:
            return self.ray.get(getattr(self.host, method).remote(*args), timeout=CALL_S)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError):
            self.returncode = LOST if self.returncode is None else self.returncode
            return None

    def poll(self) -> int | None:
        if self.returncode is None:
            code = self._call("poll")
            if self.returncode is None:
                self.returncode = code
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"ray:{self.info['node']}:{self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self._call("signal", int(sig))

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def take(self, path: str) -> str | None:
        return self._call("take", path)
