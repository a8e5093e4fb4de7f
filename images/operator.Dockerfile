# syntax=docker/dockerfile:1
# The operator image: loraplane with the `operator` extra only (kopf, the Kubernetes client),
# no torch, on a slim Python. Build from the repository root: `make images`.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# A plain (not editable) install into its own venv, copied whole into the final stage.
RUN python -m venv /opt/loraplane \
 && /opt/loraplane/bin/pip install --no-cache-dir ".[operator]"

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/loraplane /opt/loraplane
# The chart mounts an emptyDir on /tmp and makes the root filesystem read-only: nothing else
# is written (bytecode was compiled at install; HOME points at /tmp for libraries that look).
ENV PATH=/opt/loraplane/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 65532:65532
ENTRYPOINT ["loraplane-operator"]
