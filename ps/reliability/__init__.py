"""Surviving failures, one module for each role that can fail.

    worker_failover    a dead worker: fence it, deal its tasks again, admit a replacement
    checkpoint         coordinated shard files and the manifest that commits them
    server_recovery    a lost server: commit checkpoints, roll back, resume (--resume)
    journal            the scheduler's append-only record of its decisions
    scheduler_restart  a restarted scheduler: replay the journal, gather the cluster again
"""
