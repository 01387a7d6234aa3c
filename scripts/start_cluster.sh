#!/usr/bin/env bash
# Start a parameter-server cluster (1 scheduler, S servers, M workers), train a job,
# stop everything, and exit non-zero if the run failed. `--help` lists the flags.
# Roles run on this machine: on loopback, or each in its own network namespace with
# --netns (as root); with --hosts FILE, on other machines over ssh; with --ray ADDRESS,
# on the nodes of a Ray cluster (docs/multihost.md).
# With no flags: the MLP classifier example on 2 servers and 2 workers in BSP.
set -euo pipefail
cd "$(dirname "$0")/.."
case " $* " in
  *" --help "*|*" -h "*) ;;
  *" --ray "*|*" --ray="*) scripts/setup.sh --quiet --ray ;;   # Ray too, the first time
  *) scripts/setup.sh --quiet ;;
esac
exec "${PYTHON:-python3}" -m ps.launch "$@"
