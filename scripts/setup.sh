#!/usr/bin/env bash
# Install what the project needs, once; a no-op when everything is already importable.
#
# torch: a torch the user already has is never replaced. Where none is present we pick a
# build that suits the machine: with an NVIDIA GPU, the default (CUDA) wheel; without one,
# torch==2.13.0, which machines of this kind hold as a CPU build on local disk (an unpinned
# "torch" would resolve to a multi-GB CUDA build). PS_TORCH_SPEC overrides the choice.
#
#   scripts/setup.sh [--quiet] [--ray]     --ray: also Ray, for start_cluster.sh --ray
#   PS_SETUP_TESTS=1 scripts/setup.sh      also what the tests use: pytest, and (best
#                                          effort: their tests skip without them) Ray and
#                                          the Kubernetes schemas of tests/test_k8s.py
set -euo pipefail
PYTHON=${PYTHON:-python3}
RAY_SPEC=${PS_RAY_SPEC:-ray==2.60.0}
K8S_SCHEMAS=kubernetes-validate==1.37.0
quiet=
ray=0
for arg in "$@"; do
  case "$arg" in
    --quiet) quiet=--quiet ;;
    --ray) ray=1 ;;
    *) echo "setup: unknown option $arg (want --quiet, --ray)" >&2; exit 2 ;;
  esac
done

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
if [ "$ray" = 1 ] && ! have ray; then
  echo "setup: installing $RAY_SPEC" >&2
  "$PYTHON" -m pip install -q "$RAY_SPEC"
fi
if [ "${PS_SETUP_TESTS:-0}" = 1 ]; then      # optional: a failure leaves their tests skipped
  optional=()
  have ray || optional+=("$RAY_SPEC")
  have kubernetes_validate || optional+=("$K8S_SCHEMAS")
  if [ ${#optional[@]} -gt 0 ]; then
    echo "setup: installing ${optional[*]} (for the Ray and Kubernetes tests)" >&2
    "$PYTHON" -m pip install -q "${optional[@]}" \
      || echo "setup: could not install ${optional[*]}; their tests will be skipped" >&2
  fi
fi
say "ready ($("$PYTHON" -c 'import torch, zmq; print("torch", torch.__version__, "| pyzmq", zmq.__version__)'))"
