"""Authenticated, encrypted transport (CurveZMQ) and binding identities to keys.

With ``--secure DIR`` every connection is a CurveZMQ connection: encrypted, and
authenticated both ways. The scheduler and each server bind a CURVE *server*
socket with their own key pair and run a ZAP handler (pyzmq's ``zmq.auth``) whose
allow-list is the set of public keys in ``DIR/public``: a client whose key is not
there never completes its handshake, so none of its messages reach the event loop.
Requesters (``ps.wire.client.Peer``) connect as CURVE *clients* and check the peer's
public key, so a worker cannot be fooled by an impostor server either.

A key is a name: ``scheduler``, ``server<k>``, ``worker<w>`` or ``observer`` (the
launcher's status queries and operators' tools). The ZAP handler sets each
message's ``User-Id`` property to that name, and ``check_sender`` compares it with
who the header claims to be: worker 1's key cannot push, pull, lease or report as
worker 0 (``forbidden``). So a secure role must know its own name: a server needs
``--shard``, a worker ``--id``.

Key files (``python -m ps.security.keys DIR``) are zmq.auth certificates::

    DIR/public/<name>.key            every role's public key: the allow-list; copy to every host
    DIR/private/<name>.key_secret    one role's key pair: only that role's host needs it

Who calls what: each role's ``main`` calls ``use(Keyring(DIR, name))`` once; ``Peer``
calls ``secure_client`` before it connects; the scheduler and the servers call
``secure_server`` before they bind and ``check_sender`` on every request. Without
``use`` every function here is a no-op, and plaintext is what a loopback cluster gets.
"""
from __future__ import annotations

import ipaddress
import logging
import os

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from ps.wire.protocol import Error, Kind, ProtocolError

log = logging.getLogger("ps.security")

OBSERVER = "observer"           # the key of launchers and operators: STATUS and STATS only
ZAP_DOMAIN = "ps"               # one domain for the whole cluster
OPEN_KINDS = frozenset({Kind.STATUS, Kind.STATS})   # any authenticated key may ask these
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


class Keyring:
    """One role's key pair and every public key of the cluster (the allow-list)."""

    def __init__(self, directory: str, name: str):
        self.directory, self.name = directory, name
        secret_file = os.path.join(directory, "private", f"{name}.key_secret")
        if not os.path.isfile(secret_file):
            raise FileNotFoundError(f"no key pair for {name!r}: {secret_file} is missing "
                                    f"(make one with: python -m ps.security.keys {directory})")
        self.public_key, self.secret_key = zmq.auth.load_certificate(secret_file)
        self.public_dir = os.path.join(directory, "public")
        self.names: dict[bytes, str] = {}        # z85 public key -> name
        for entry in sorted(os.listdir(self.public_dir)):
            if entry.endswith(".key"):
                key, _ = zmq.auth.load_certificate(os.path.join(self.public_dir, entry))
                self.names[key] = entry[:-len(".key")]

    def public(self, name: str) -> bytes:
        """The public key of ``name`` (a peer we connect to must prove it holds it)."""
        for key, holder in self.names.items():
            if holder == name:
                return key
        raise FileNotFoundError(f"no public key for {name!r} in {self.public_dir}")


_active: Keyring | None = None


def use(keyring: Keyring | None) -> None:
    """Make every socket this process opens from now on a CurveZMQ socket (None: plaintext)."""
    global _active
    _active = keyring


def active() -> Keyring | None:
    return _active


class _AllowList(ThreadAuthenticator):
    """pyzmq's ZAP handler, with each accepted key's User-Id set to its holder's name."""

    def __init__(self, context: zmq.Context, keyring: Keyring):
        super().__init__(context, log=logging.getLogger("ps.security.zap"))
        self.keyring = keyring

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.keyring.names.get(z85.encode(client_public_key), "?")


def secure_server(ctx: zmq.Context, sock: zmq.Socket) -> ThreadAuthenticator | None:
    """Make a ROUTER (before it binds) a CURVE server that admits the allow-list only.

    Returns the ZAP handler (stop it before the context ends), or None in plaintext.
    The handler must run before the first client connects: libzmq admits every CURVE
    client when no handler is bound, so it is started here, before ``bind``.
    """
    if _active is None:
        return None
    auth = _AllowList(ctx, _active)
    auth.start()
    auth.configure_curve(domain=ZAP_DOMAIN, location=_active.public_dir)   # the allow-list
    sock.curve_secretkey = _active.secret_key
    sock.curve_publickey = _active.public_key
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN.encode()
    return auth


def secure_client(sock: zmq.Socket, peer: str) -> None:
    """Make a socket (before it connects) a CURVE client of ``peer`` (a key name)."""
    if _active is None:
        return
    sock.curve_secretkey = _active.secret_key
    sock.curve_publickey = _active.public_key
    sock.curve_serverkey = _active.public(peer)


def stop(auth: ThreadAuthenticator | None) -> None:
    if auth is not None:
        auth.stop()


def sender(frame) -> str | None:
    """The key name the ZAP handler attached to a received frame (None in plaintext)."""
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):      # no metadata: not a CURVE connection
        return None


def claimed(header: dict) -> str | None:
    """Who a request says it is, as a key name; None for kinds anyone may send."""
    kind = header["kind"]
    if kind in OPEN_KINDS:
        return None
    if kind == Kind.HEARTBEAT:
        return f"{header['role']}{header['index']}"
    if kind == Kind.REGISTER:
        if isinstance(header.get("inc"), int) and header["inc"] > 0:   # registering again after
            return f"{header['role']}{header.get('index')}"   # a restart: the scheduler acts on index
        field = "shard" if header["role"] == "server" else "worker"     # a first REGISTER
        return f"{header['role']}{header.get(field, header.get('index'))}"
    return f"worker{header.get('worker')}"


def check_sender(frame, header: dict) -> None:
    """Refuse (``forbidden``) a request whose key is not the identity it claims.

    Called after the header is decoded, before the handler looks at anything: an
    authenticated worker speaking for another worker, a server registering under
    another shard's index, or the observer key asking for more than STATUS/STATS.
    """
    if _active is None:
        return
    user, claim = sender(frame), claimed(header)
    if user is None:
        raise ProtocolError(Error.FORBIDDEN, "no authenticated key on this connection")
    if claim is not None and user != claim:
        raise ProtocolError(Error.FORBIDDEN, f"key {user!r} may not speak as {claim!r}")


def is_loopback(endpoint: str) -> bool:
    """True for inproc/ipc and tcp endpoints bound to a loopback address."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:                   # *, 0.0.0.0 as a name, an interface name, a host name
        return False


def warn_if_exposed(endpoint: str, role: str) -> None:
    """Say loudly when a plaintext role listens beyond this machine."""
    if _active is None and not is_loopback(endpoint):
        message = (f"the {role} listens on {endpoint} without --secure: anyone who can "
                   "reach this address can read the traffic and send it requests. Use --secure "
                   "(see SECURITY.md), or bind to 127.0.0.1.")
        log.warning("%s", message)
