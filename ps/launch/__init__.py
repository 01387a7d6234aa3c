"""Starting a cluster (``scripts/start_cluster.sh``, ``python -m ps.launch``).

    launcher    one run from start to summary, --resume and --recover attempts
    flags       the launcher's flags, and which combinations are refused
    processes   the scheduler, server and worker processes of one attempt
    hosts       roles on other machines over ssh (--hosts FILE)
    netns       every role in its own network namespace (--netns), and cutting links
    ray_engine  roles on the nodes of a Ray cluster (--ray ADDRESS): where each one runs
    ray_host    the Ray actor that owns a role's process on its node, and the launcher's handle
    contract    the environment a cluster manager sets; python -m ps becomes that role
    statusline  the live progress line
"""
