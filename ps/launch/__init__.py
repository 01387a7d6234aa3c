"""Starting a cluster (``scripts/start_cluster.sh``, ``python -m ps.launch``).

    launcher    flags, one run from start to summary, --resume and --recover attempts
    processes   the scheduler, server and worker processes of one attempt
    hosts       roles on other machines over ssh (--hosts FILE)
    netns       every role in its own network namespace (--netns), and cutting links
    statusline  the live progress line
"""
