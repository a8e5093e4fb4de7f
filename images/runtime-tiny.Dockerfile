# syntax=docker/dockerfile:1
# The runtime image with the tiny test model and its demo adapters built in, for kind and
# other clusters without a model store: /models/tiny/base and /models/tiny/adapters/<name>
# (sql-expert, support-bot, poet), served as file:///models/tiny/... (e2e/kind/tiny.yaml).
# Seeded, so every build writes the same weights. Build from the repository root after
# runtime.Dockerfile: `make kind-deploy` does both.
# The runtime image to start from, with its tag: no default, so it never drifts from appVersion.
ARG RUNTIME_IMAGE
FROM ${RUNTIME_IMAGE}
USER 0:0
RUN python3 -c "from loraplane.testing.tiny import build_demo; build_demo('/models/tiny')" \
 && chmod -R a+rX /models
USER 65532:65532
ENTRYPOINT ["loraplane-runtime"]
