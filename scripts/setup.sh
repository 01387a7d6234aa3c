#!/usr/bin/env bash
# Install what the project needs, once; a no-op when everything is already importable.
#
# torch: a torch the user already has is never replaced. Where none is present we pick a
# build that suits the machine: with an NVIDIA GPU, the default (CUDA) wheel; without one,
# torch==2.13.0, which machines of this kind hold as a CPU build on local disk (an unpinned
# "torch" would resolve to a multi-GB CUDA build). PS_TORCH_SPEC overrides the choice.
set -euo pipefail
PYTHON=${PYTHON:-python3}
quiet=${1:-}

have() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }
say() { [ "$quiet" = "--quiet" ] || echo "setup: $*" >&2; }

if ! have torch; then
  if [ -n "${PS_TORCH_SPEC:-}" ]; then spec=$PS_TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then spec=torch
  else spec=torch==2.13.0
  fi
  echo "setup: installing $spec (no torch found)" >&2
  "$PYTHON" -m pip install -q "$spec"
fi
missing=()
have zmq || missing+=(pyzmq)
have msgpack || missing+=(msgpack)
have numpy || missing+=(numpy)
if [ "${PS_SETUP_TESTS:-0}" = 1 ]; then
  have pytest || missing+=(pytest)
  have pytest_timeout || missing+=(pytest-timeout)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  "$PYTHON" -m pip install -q "${missing[@]}"
fi
say "ready ($("$PYTHON" -c 'import torch, zmq; print("torch", torch.__version__, "| pyzmq", zmq.__version__)'))"
