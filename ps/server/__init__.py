"""A server process: one shard of the parameters behind a ZeroMQ ROUTER (``python -m ps.server``).

    server   the event loop: receive, validate, call ``ps.core.shard``, reply
    config   ServerConfig and the flags that build it
    norm     clipping: sending this shard's part of a step's norm until the total comes
    checkpoints  this shard's part of coordinated checkpoints, written off the event loop
"""
