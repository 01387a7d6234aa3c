"""``python -m ps.security.keys DIR --servers S --workers M``: the key pairs of a secure cluster.

Writes one zmq.auth certificate pair per role (``scheduler``, ``server0`` ..
``server<S-1>``, ``worker0`` .. ``worker<M-1>``, and ``observer`` for launchers and
operators' tools) in the layout ``ps.security.curve`` reads::

    DIR/public/<name>.key            copy the whole folder to every host: the allow-list
    DIR/private/<name>.key_secret    give each host only the files of the roles it runs

Existing pairs are kept (run it again with a larger S or M to add roles), so keys
already handed out stay valid. Secret files are created readable by their owner only.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import zmq.auth

from ps.security.curve import OBSERVER


def role_names(servers: int, workers: int) -> list[str]:
    return (["scheduler", OBSERVER] + [f"server{k}" for k in range(servers)]
            + [f"worker{w}" for w in range(workers)])


def generate(directory: str, servers: int, workers: int) -> list[str]:
    """Make the key pairs that are missing under ``directory``; return the names made."""
    public, private = os.path.join(directory, "public"), os.path.join(directory, "private")
    os.makedirs(public, exist_ok=True)
    os.makedirs(private, mode=0o700, exist_ok=True)
    made = []
    for name in role_names(servers, workers):
        if os.path.exists(os.path.join(private, f"{name}.key_secret")):
            continue
        old = os.umask(0o077)                 # the secret file is never readable by others
        try:
            with tempfile.TemporaryDirectory(dir=private) as tmp:
                pub_file, secret_file = zmq.auth.create_certificates(tmp, name)
                os.replace(pub_file, os.path.join(public, f"{name}.key"))
                os.chmod(os.path.join(public, f"{name}.key"), 0o644)
                os.replace(secret_file, os.path.join(private, f"{name}.key_secret"))
        finally:
            os.umask(old)
        made.append(name)
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ps.security.keys",
                                description="Generate the CurveZMQ key pairs of a secure cluster.")
    p.add_argument("directory", help="where to write public/ and private/")
    p.add_argument("--servers", type=int, default=2, help="servers (shards) S (default: 2)")
    p.add_argument("--workers", type=int, default=2, help="workers M (default: 2)")
    a = p.parse_args(argv)
    if a.servers < 1 or a.workers < 1:
        p.error("--servers and --workers must be >= 1")
    made = generate(a.directory, a.servers, a.workers)
    print(f"{len(made)} new key pairs in {a.directory} "
          f"({', '.join(made) if made else 'all already there'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
