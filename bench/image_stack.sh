#!/usr/bin/env bash
# The runtime's CPU tests and the kernels' ahead-of-time compile, on the versions the GPU
# bench image has instead of our pins, here, before device minutes are spent finding out.
#   bench/image_stack.sh          (~6 min; ~0.7 GB of wheels, fetched once into $VENV)
#   Run it before a GPU run (not in .ci/run: its wheels and minutes are for that run only).
#
# bench/run_all.sh --gpu runs on the image's own torch, triton, transformers, tokenizers,
# safetensors and huggingface-hub (/work/.library/device/KINDS.md lists them; gpu_wheels.sh
# says why they are not carried), which are older than our pins. So:
#   1. a venv of .venv's packages with those six replaced by the image's versions, Triton
#      excepted (3.6's interpreter cannot run our persistent loops: a loaded count as a loop
#      bound is a 1-element array there; compiled, the loop is fine), runs tests/runtime;
#   2. the image's Triton compiles every kernel for sm_90, the H200's (test_kernels_compile.py).
# The wheels are PyPI's CUDA builds: torch loads its CUDA libraries at import even on a CPU,
# so the venv borrows .venv's (CUDA 13.x, the same sonames) and adds libcurand, which our
# torch does not need and 2.11 does. Python here is 3.11; the image's is 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
# As last read off the image (KINDS.md, 2026-11); update when it changes.
TORCH=2.11.0 TRITON=3.6.0 TRANSFORMERS=5.17.0 HF_HUB=1.33.0 TOKENIZERS=0.23.2 SAFETENSORS=0.8.0
VENV=${VENV:-$PWD/.venv-image-stack} # ignored (.venv-*/); its links point into this .venv
[[ -x .venv/bin/python ]] || { echo "no .venv: make install first" >&2; exit 1; }
OURS=$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')
[[ -d $OURS/nvidia ]] || { echo "no $OURS/nvidia: make install first" >&2; exit 1; }

if [[ ! -f $VENV/.ready ]]; then
  rm -rf "$VENV"
  .venv/bin/python -m venv "$VENV"
  site=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  replaced='torch|triton|transformers|huggingface-hub|tokenizers|safetensors'
  .venv/bin/python -m pip freeze --exclude-editable |
    grep -viE "^(($replaced)==|nvidia|cuda)" >"$VENV/ours.txt"
  "$VENV/bin/pip" install -q --no-deps -r "$VENV/ours.txt"
  "$VENV/bin/pip" install -q --no-deps "torch==$TORCH" "transformers==$TRANSFORMERS" \
    "huggingface-hub==$HF_HUB" "tokenizers==$TOKENIZERS" "safetensors==$SAFETENSORS" \
    "triton==$(.venv/bin/python -c 'import triton; print(triton.__version__)')"
  "$VENV/bin/pip" install -q --no-deps --target "$VENV/image-triton" "triton==$TRITON"
  "$VENV/bin/pip" install -q --no-deps --target "$VENV/curand" "nvidia-curand==10.*"
  ln -s "$OURS/nvidia" "$site/nvidia"
  for d in "$OURS"/cuda*; do ln -s "$d" "$site/"; done
  touch "$VENV/.ready"
fi
export LD_LIBRARY_PATH=$VENV/curand/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONPATH=$PWD/src
"$VENV/bin/python" -c 'import torch, transformers, tokenizers, safetensors, huggingface_hub as h
print("torch", torch.__version__, "transformers", transformers.__version__, "tokenizers",
      tokenizers.__version__, "safetensors", safetensors.__version__, "huggingface-hub", h.__version__)'

status=0
echo "== tests/runtime on the image's torch and transformers"
"$VENV/bin/python" -m pytest tests/runtime -q -p no:cacheprovider || status=1
export PYTHONPATH=$VENV/image-triton:$PYTHONPATH
echo "== every kernel compiled for sm_90 by Triton" \
  "$("$VENV/bin/python" -c 'import triton; print(triton.__version__)')"
LORAPLANE_COMPILE_ARCHS=90 \
  "$VENV/bin/python" -m pytest tests/runtime/test_kernels_compile.py -q -p no:cacheprovider ||
  status=1
exit $status
