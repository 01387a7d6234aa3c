"""The wire: what a message is and how it moves.

    protocol    message kinds, header fields and their types, error codes, limits
    transport   tensors cut into raw frames, sent and received without copies; socket options
    validation  a server's checks of a tensor request against its shard
    client      request/reply with retries and deadlines (Lazy Pirate): Peer, ShardClient
"""
