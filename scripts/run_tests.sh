#!/usr/bin/env bash
# Set up (if needed) and run the tests. Extra arguments go to pytest.
#
#   scripts/run_tests.sh           the full tier (what CI runs): every test but the
#                                  benchmark smoke tests; about 9 minutes on 2 cores
#   scripts/run_tests.sh --fast    under 2 minutes: every in-process test and one cluster
#                                  per mechanism (tests marked slow are left out)
#   scripts/run_tests.sh --bench   the benchmark smoke tests (scripts/benchmark.py --tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
PS_SETUP_TESTS=1 scripts/setup.sh --quiet
case "${1:-}" in
  --fast) shift; tier=(-m "not slow and not bench") ;;
  --bench) shift; tier=(-m bench) ;;
  *) tier=(-m "not bench") ;;
esac
exec "${PYTHON:-python3}" -m pytest -q "${tier[@]}" "$@"
