#!/usr/bin/env bash
# The one prepared benchmark run: what the machine is, correctness on the device, then every
# timing, each step under its own time limit and in its own log.
#   bench/run_all.sh --gpu [STEP...]   # the lent GPU machine, one call, ~6 min on an H200
#   bench/run_all.sh --cpu [STEP...]   # tiny sizes on a CPU, Triton interpreter: proves the scripts
# Steps, in order: probe gpu-tests engine host decode kernels serve cuda-tests processes (all by
# default), and serve-8b (the 7B-shaped serve against PEFT, ~5 min) only when named.
#
# Each step's stdout+stderr goes to /tmp/bench-logs/STEP.log; when OUT is set (the device tool
# returns what is under $OUT, at most 8 files) they are packed into $OUT/bench-logs.tgz after
# every step, so a run cut short still brings back what it did. Stdout gets the step's key
# lines (its log's tail when it failed) and a summary line, and at the end a table of every
# step's exit code and seconds. A step over its limit is killed (rc 124) and the run goes on;
# the run stops starting steps when BENCH_BUDGET_S (default 480 s on a GPU) is spent, so it
# always ends with the table. Exits non-zero if any step failed or was skipped.
#
# On the lent GPU machine there is no .venv and no network: its python3 has torch, triton,
# transformers and peft, and bench/gpu_wheels.sh (run here first) puts the rest in .whl/,
# which this script installs into /tmp/site. The device call: carry [".whl"], command
# "bench/run_all.sh --gpu", timeout_s 540 (docs/benchmarks.md).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
shift || true
steps=" probe gpu-tests cuda-tests kernels decode engine host serve processes serve-8b "
case "$mode" in
  --gpu) budget=${BENCH_BUDGET_S:-480} ;;
  --cpu) budget=${BENCH_BUDGET_S:-1500} ;;
  *) mode=usage ;;
esac
wanted=("$@")
for w in "${wanted[@]}"; do [[ $steps == *" $w "* ]] || mode=usage; done
if [[ $mode == usage ]]; then
  echo "usage: $0 --gpu|--cpu [STEP...], STEP one of:$steps" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOGS=/tmp/bench-logs
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log # this run's steps only
status=0
summary=()

if [[ -z ${PY:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
# Where the project is not installed (the GPU image), import it from src/ and add the
# carried wheels. The repo root holds no loraplane/, so this asks the interpreter alone.
if ! "$PY" -c 'import loraplane' 2>/dev/null; then
  SITE=${SITE:-/tmp/site} WHEELS=${WHEELS:-.whl}
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    start=$SECONDS
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl >/tmp/bench-wheels.log 2>&1; then
      echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS/ into $SITE ($((SECONDS - start)) s)"
    else
      echo "!! installing $WHEELS/*.whl into $SITE failed:"
      tail -n 20 /tmp/bench-wheels.log
      status=1
    fi
  else
    echo "!! no $WHEELS/*.whl: run bench/gpu_wheels.sh first, where pip reaches the registry"
  fi
  export PYTHONPATH=$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
deadline=$budget # SECONDS counts from the script's start

selected() {
  if ((${#wanted[@]} == 0)); then [[ $1 != serve-8b ]]; return; fi
  local w
  for w in "${wanted[@]}"; do [[ $w == "$1" ]] && return 0; done
  return 1
}

# step NAME LIMIT_S KEY_REGEX COMMAND...: run it under a time limit into its log, print its key lines.
step() {
  local name=$1 limit=$2 keys=$3 rc why=""
  shift 3
  selected "$name" || return 0
  local left=$((deadline - SECONDS)) log=$LOGS/$name.log start=$SECONDS
  if ((left < 20)); then
    summary+=("$(printf '%-11s skipped: the %d s budget was spent' "$name" "$budget")")
    status=1
    return
  fi
  ((limit > left)) && limit=$left
  echo
  echo "== $name (limit $limit s): $*"
  timeout -k 10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  grep -E "$keys" "$log" | cut -c1-160 | tail -n 60
  if ((rc != 0)); then
    ((rc == 124 || rc == 137)) && why=" (timed out at $limit s)"
    echo "-- $name failed: rc $rc$why; the end of $log:"
    tail -n 25 "$log" | cut -c1-200
    status=1
  fi
  summary+=("$(printf '%-11s rc %-3s %4d s  %s%s' "$name" "$rc" $((SECONDS - start)) "$log" "$why")")
  echo "-- $name: rc $rc in $((SECONDS - start)) s$why"
  if [[ -n ${OUT:-} ]]; then tar -czf "$OUT/bench-logs.tgz" -C "$LOGS" . 2>/dev/null; fi
}

# Key lines: the probe without the package rows that match our pins; pytest's verdicts;
# the scripts' checks, tables and targets.
probe_keys='^(#|##|python|host|torch |TRITON|GPU|driver|[0-9]|pid|device copy|matmul|no mask|bool mask|    |triton kernel|torch x|site|q/o|k/v|gate|down|!!)|MISSING|pinned'
test_keys='(passed|failed|error|skipped|deselected|^FAILED|^ERROR)'
kernel_keys='^(#|check|base GEMM|rank|tile|  shrink|  expand| +[0-9]+ +[0-9]+ )'
decode_keys='^(# attention|# device|# batch|check|configuration|lora off|plain model|no adapter|N=|peft|target)'
host_keys='^(# |engine step|DecodeInputs)'
engine_keys='^(# |check|configuration|plain|no adapter|[0-9]+ adapters?|target)'
serve_keys='^(#|loraplane-runtime|PEFT|ratio|one process|engine in)'
cuda_tests=(tests/runtime/test_kernels.py tests/runtime/test_lora_peft.py tests/runtime/test_lora_slots.py)
pytest=("$PY" -m pytest -q -p no:cacheprovider)

if [[ $mode == --gpu ]]; then
  # Limits: about twice each step's expected time on an H200 (docs/benchmarks.md).
  # Most telling first: the budget cuts the tail. engine times the serving engine itself
  # (graphs, paged attention, LoRA slots, sampler) against the targets.
  step probe 60 "$probe_keys" "$PY" bench/probe.py
  step gpu-tests 180 "$test_keys" "${pytest[@]}" -m gpu tests/runtime
  step engine 150 "$engine_keys" "$PY" bench/engine_step.py
  step host 60 "$host_keys" "$PY" bench/host_step.py
  step decode 180 "$decode_keys" "$PY" bench/decode.py
  step kernels 90 "$kernel_keys" "$PY" bench/kernels.py
  step serve 150 "$serve_keys" "$PY" bench/serve.py
  # The random-mix kernel tests and PEFT-exactness of the Triton path, now on CUDA.
  step cuda-tests 120 "$test_keys" "${pytest[@]}" "${cuda_tests[@]}"
  # The engine in its own process against one process, 64 clients streaming every token: with
  # a stub device of 5 ms a step on this machine's many cores, then the ~100M model on the GPU.
  step processes 180 "$serve_keys" bash -c "$PY bench/processes.py --device-ms 5 && \
    $PY bench/serve.py --stream --engine-process-ratio --concurrency 64 --requests 256"
  step serve-8b 540 "$serve_keys" "$PY" bench/serve.py --model llama3-8b-shaped --adapters 32
else
  export TRITON_INTERPRET=1
  step probe 300 "$probe_keys" "$PY" bench/probe.py --cpu
  step gpu-tests 300 "$test_keys" "${pytest[@]}" -m gpu tests/runtime
  step cuda-tests 300 "$test_keys" "${pytest[@]}" "${cuda_tests[@]}"
  step kernels 300 "$kernel_keys" "$PY" bench/kernels.py --cpu --tiny
  step decode 300 "$decode_keys" "$PY" bench/decode.py --cpu --tiny
  step engine 300 "$engine_keys" "$PY" bench/engine_step.py --cpu --tiny
  step host 300 "$host_keys" "$PY" bench/host_step.py
  step serve 300 "$serve_keys" "$PY" bench/serve.py --cpu --tiny
  step processes 300 "$serve_keys" "$PY" bench/processes.py --device-ms 5
fi

echo
echo "== run_all $mode: $((SECONDS)) s (budget $budget s), logs in $LOGS"
printf '%s\n' "${summary[@]}"
echo "run_all $mode: $([[ $status == 0 ]] && echo ok || echo FAILED) in $SECONDS s"
exit $status
