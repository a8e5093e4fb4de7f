# syntax=docker/dockerfile:1
# The runtime image: loraplane with the `runtime` extra (torch, Triton, transformers, PEFT) on
# a CUDA base. The operator also runs each base's router from this image (`loraplane-router`).
# Build from the repository root: `make images`. Without a GPU the runtime runs on the CPU
# (the operator passes --device cpu to bases with `gpus: 0`).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python3 -m venv /opt/loraplane \
 && /opt/loraplane/bin/pip install --no-cache-dir ".[runtime,router]"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# Triton compiles a small C launcher the first time a kernel runs: it needs a C compiler and
# Python's headers at run time, not only at build time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 gcc libc6-dev python3-dev \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/loraplane /opt/loraplane
# Writable places for a non-root user: the operator's default cache root
# (LORAPLANE_CACHE_ROOT, where each pod downloads weights) and /tmp for every library cache.
# Mount an emptyDir or a volume on both to run with a read-only root filesystem.
RUN mkdir -p /var/cache/loraplane && chown 65532:65532 /var/cache/loraplane
ENV PATH=/opt/loraplane/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    XDG_CACHE_HOME=/tmp/cache
USER 65532:65532
ENTRYPOINT ["loraplane-runtime"]
