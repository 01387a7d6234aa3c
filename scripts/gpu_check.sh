#!/usr/bin/env bash
# The checks that need a CUDA device, as one prepared script (a few minutes on one GPU):
#   1. the GPU tests (tests/test_gpu.py): the BSP oracle on CUDA workers, 1-3 workers x
#      1-2 servers x SGD/Adam, each printing the largest relative deviation it saw; the
#      pinned host buffers; the MLP and the char transformer examples learning on CUDA;
#   2. the defaults benchmark with the workers on CUDA: ours (2 workers x 2 servers, BSP)
#      against torch DDP (NCCL with a GPU per process where there are two, else gloo on
#      CUDA tensors), 10M MLP, SGD momentum, batch 128;
#   3. the char transformer example on CUDA, 2 workers x 2 servers, timed.
# Figures go to bench/gpu/ (JSON) and to the terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
PS_SETUP_TESTS=1 scripts/setup.sh --quiet
PY=${PYTHON:-python3}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(), 'x', torch.cuda.device_count())"
mkdir -p bench/gpu
echo "== 1. GPU tests"
timeout 300 "$PY" -m pytest -q -m gpu -s tests/test_gpu.py "$@" | tee bench/gpu/tests.txt
echo "== 2. defaults benchmark on CUDA (ours vs DDP)"
timeout 240 "$PY" scripts/benchmark.py defaults --device cuda --pairs ddp --repeats 2 --steps 60 \
  --out bench/gpu/defaults.json
echo "== 3. char transformer on CUDA"
timeout 120 "$PY" -m ps.launch --job examples/char_transformer.py --device cuda --steps 300 \
  --out bench/gpu/char_transformer | tail -n 4
