#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PS_SETUP_TESTS=1 scripts/setup.sh --quiet
exec "${PYTHON:-python3}" -m pytest -q "$@"
