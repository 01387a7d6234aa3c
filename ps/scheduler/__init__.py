"""The scheduler process: the control path, never a tensor byte (``python -m ps.scheduler``).

    scheduler     the event loop and its phases (forming, training, finishing)
    config        SchedulerConfig and the flags that build it
    membership    who is in the cluster, incarnations, who went silent (Paranoid Pirate)
    registration  the checks a REGISTER must pass
    forming       from the first REGISTER to every member's configuration
    finishing     the end of a run: DONE, FINISHED, a job error, the summary
    joberror      the checks of a worker's report that the job's own code raised
    runstate      losses, work per worker, what is done
    norms         clipping: the shards' parts of a BSP step's gradient norm, summed
    diagnose      what a waiting step waits for, by name
    summary       summary.json
"""
