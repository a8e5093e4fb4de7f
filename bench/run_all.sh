#!/usr/bin/env bash
# The one prepared benchmark run: check correctness, then time everything, printing every number.
#   bench/run_all.sh --gpu   # a GPU machine, one call, well under 10 minutes on an H200
#   bench/run_all.sh --cpu   # tiny sizes on a CPU under the Triton interpreter: proves the scripts
# Installs nothing from the network (make install does here). Keeps going after a failure so
# one run gives every number, and exits non-zero if any step failed.
#
# On the lent GPU machine there is no .venv and no network: its python3 has torch, triton,
# transformers and peft, and bench/gpu_wheels.sh (run here first) puts the rest in .whl/,
# which this script installs into /tmp/site. The device call: carry [".whl"], command
# "bench/run_all.sh --gpu".
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then
  PY=${PY:-.venv/bin/python}
else
  PY=${PY:-python3}
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  # The project is not pip-installed there: import it from the tree.
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
mode=${1:-}
status=0

run() {
  local start=$SECONDS
  echo
  echo "+ $*"
  "$@" || { echo "!! failed: $*"; status=1; }
  echo "  ($((SECONDS - start)) s)"
}

case "$mode" in
  --gpu)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    run "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/runtime
    # The random-mix kernel tests and PEFT-exactness of the Triton path, now on CUDA.
    run "$PY" -m pytest -q -p no:cacheprovider tests/runtime/test_kernels.py \
      tests/runtime/test_lora_peft.py tests/runtime/test_lora_slots.py
    run "$PY" bench/kernels.py
    run "$PY" bench/decode.py
    run "$PY" bench/serve.py
    ;;
  --cpu)
    export TRITON_INTERPRET=1
    run "$PY" -m pytest -q -p no:cacheprovider tests/runtime/test_kernels.py
    run "$PY" bench/kernels.py --cpu --tiny
    run "$PY" bench/decode.py --cpu --tiny
    run "$PY" bench/serve.py --cpu --tiny
    ;;
  *)
    echo "usage: $0 --gpu|--cpu" >&2
    exit 2
    ;;
esac
echo
echo "run_all $mode: $([[ $status == 0 ]] && echo ok || echo FAILED) in $SECONDS s"
exit $status
