"""The pure core: every rule the cluster follows, as numpy and plain Python, with no sockets.

    sharding   a model's named tensors as one flat vector, cut into S ranges of equal bytes
    tasks      epochs cut into steps, steps into tasks (micro-batches with unique ids)
    dealer     tasks dealt into one deque per worker, leased, and stolen by idle workers
    shard      one shard's parameters, its consistency gate and its exactly-once pushes
    optim      the server-side optimizers (SGD, Adam, AdamW), in place and in chunks
    param_groups  one optimizer per parameter group's range of a shard
    compress   float16 / bfloat16 encodings of a float32 payload

The event loops in ``ps.server`` and ``ps.scheduler`` only receive, validate, call these
and send; each is tested in-process, in microseconds.
"""
