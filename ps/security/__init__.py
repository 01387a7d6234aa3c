"""Authenticated, encrypted links (``--secure DIR``).

    curve   CurveZMQ sockets, the allow-list, binding a role's identity to its key
    keys    ``python -m ps.security.keys``: generate the key pairs of a secure cluster
"""
