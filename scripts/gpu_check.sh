#!/usr/bin/env bash
# Run the GPU tests (and a short CUDA training run) on a machine with a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
PS_SETUP_TESTS=1 scripts/setup.sh --quiet
"${PYTHON:-python3}" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"${PYTHON:-python3}" -m pytest -q -m gpu tests "$@"
