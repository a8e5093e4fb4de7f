#!/usr/bin/env bash
# Fetch, here, the wheels the GPU machine's python3 needs beside its own packages, at the
# versions our .venv resolved, into .whl/ (ignored via .git/info/exclude); bench/run_all.sh
# --gpu installs them into /tmp/site there (no network there). About 10 MB.
#   bench/gpu_wheels.sh   then: device run, carry [".whl"], command "bench/run_all.sh --gpu"
#
# What the image lacks (/work/.library/device/KINDS.md lists what it has), found by walking
# the Requires-Dist of what the runtime imports (`import loraplane.runtime.__main__` and
# its server: fastapi, uvicorn, sse-starlette, pydantic, prometheus-client, httpx, yaml) and
# of what the GPU steps import (pytest-asyncio: pyproject sets asyncio_mode; openai for the
# serving tests), skipping what the image has:
missing=(
  pydantic pydantic_core annotated-types typing-inspection # the API models
  fastapi starlette sse-starlette uvicorn opentelemetry-api # the server (fastapi needs otel)
  openai jiter httpx2 httpcore2 truststore sniffio # the openai client (tests)
  pytest-asyncio
)
# The image has these, at versions we have not seen; pure Python, so we carry ours, which
# our code was tested with: pydantic needs typing-extensions >= 4.16, sse-starlette anyio
# >= 4.7. Not carried: torch, triton, transformers, peft, tokenizers, safetensors,
# huggingface-hub, numpy, fsspec (the image's; transformers checks its huggingface-hub
# version at import, so ours would break the image's transformers), and s3fs (imported only
# for s3:// adapter sources).
shadow=(typing_extensions anyio httpx httpcore h11 idna certifi prometheus_client annotated-doc)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
PY=${PY:-.venv/bin/python}
names=$(printf '%s|' "${missing[@]}" "${shadow[@]}" | sed 's/[-_]/[-_]/g; s/|$//')
pins=$("$PY" -m pip freeze | grep -iE "^($names)==")
want=$((${#missing[@]} + ${#shadow[@]}))
if (($(wc -l <<<"$pins") != want)); then
  echo "found $(wc -l <<<"$pins") of $want pins in $PY's environment (make install first):" >&2
  echo "$pins" >&2
  exit 1
fi
# The GPU image runs CPython 3.12; pip matches manylinux tags exactly, so list the usual ones.
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl $pins
ls .whl
du -sh .whl
