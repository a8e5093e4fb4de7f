#!/usr/bin/env bash
# Fetch, here, the wheels the GPU machine lacks (it has torch, triton, transformers, peft,
# but no pydantic/fastapi/openai and no network), at the versions our .venv resolved, into
# .whl/ (ignored via .git/info/exclude). bench/run_all.sh --gpu installs them from there.
#   bench/gpu_wheels.sh   then: device run with carry [".whl"], command "bench/run_all.sh --gpu"
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PIP=${PIP:-.venv/bin/pip}
names='annotated-types|pydantic|pydantic_core|typing-inspection|fastapi|starlette|uvicorn|sse-starlette|openai|jiter|distro|sniffio|pytest-asyncio|annotated-doc'
pins=$("$PIP" freeze | grep -iE "^($names)==")
# The GPU image runs CPython 3.12; pip matches manylinux tags exactly, so list the usual ones.
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl $pins distro==1.9.0
ls .whl
