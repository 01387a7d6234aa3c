"""A parameter server: the scheduler and the servers (numpy only; never imports torch).

The packages, in the order to read them:

    core/         what decides, with no sockets: the flat layout and its shard cut, tasks,
                  dealing and stealing, a shard's rules (the gate, exactly-once), optimizers
    wire/         the wire contract: message kinds and checks, tensor frames, clients
    server/       a server process: one shard behind a ZeroMQ ROUTER
    scheduler/    the control path: membership, forming the cluster, leases, the summary
    reliability/  surviving failures: a dead worker, a lost server, a restarted scheduler
    security/     CurveZMQ: encrypted, authenticated links and the keys they use
    launch/       starting a cluster: local processes, other hosts, network namespaces, Ray
    k8s/          a Kubernetes JobSet manifest for one cluster (python -m ps.k8s)
    faults/       fault injection for tests and experiments (--inject)
    sparse/       sparse tables: rows by id, created on first touch, per-row optimizers

The worker, the torch side, is the top-level package ``worker``.
"""
