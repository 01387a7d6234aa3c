"""Workers: the torch side of the cluster (``python -m worker``).

    runner      the worker loop: lease, pull, compute, push, report (Worker.train_step)
    diloco      --mode diloco: H inner steps a round, then one pseudo-gradient push
    job         the job file's contract: the model, data, loss and recipe a worker takes from it
    flat        the model's parameters and gradients as flat buffers (zero-copy views)
    leases      task leases from the scheduler, asked ahead while computing
    reports     REPORTs of pushed tasks, sent without waiting
    heartbeat   liveness, from a thread of its own (Paranoid Pirate)
    waits       naming what a blocked pull waits for
    straggler   emulated slow workers and crashes at a named point (tests, benchmarks)
    config      WorkerConfig and the device
    reference   the single-process loop a BSP run equals: the oracle (python -m worker.reference)
    speedups/   optional: the next pull sent early (prefetch), pushes from backward hooks (overlap)
"""
