#!/usr/bin/env bash
# loraplane on kind, for users with Docker: `make kind-up`, `make kind-deploy`, `make kind-down`.
#
#   up      create the kind cluster (idempotent); its kubeconfig goes to .cache/kind/kubeconfig
#   deploy  build the images, load them into the nodes, install the CRDs and the chart, apply
#           the tiny model and its adapters (e2e/kind/tiny.yaml) and wait for them to be Ready
#   down    delete the cluster
#   kubeconfig  print the kubeconfig's path
#
# Environment: KIND_CLUSTER (loraplane), KIND_NODE_IMAGE (kind's default), IMAGE_REPO
# (ghcr.io/loraplane), IMAGE_TAG (the chart's appVersion), DOCKER, KIND, KUBECTL, HELM (from
# PATH; kubectl and helm fall back to the ones `make cluster-bins` built).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CHART="$REPO/charts/loraplane"
# shellcheck source=../cluster/versions.env
source "$REPO/e2e/cluster/versions.env"
CACHE_BIN="${LORAPLANE_CACHE:-$HOME/.cache/loraplane}/bin"

KIND_CLUSTER=${KIND_CLUSTER:-loraplane}
APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$CHART/Chart.yaml")
IMAGE_REPO=${IMAGE_REPO:-ghcr.io/loraplane}
IMAGE_TAG=${IMAGE_TAG:-$APP_VERSION}
DOCKER=${DOCKER:-docker}
KIND=${KIND:-kind}
KUBECONFIG_FILE="$REPO/.cache/kind/kubeconfig"
RELEASE=loraplane
RELEASE_NAMESPACE=loraplane-system
DEMO_NAMESPACE=loraplane-demo

tool() {  # tool NAME BUILT_PATH: from PATH, else what `make cluster-bins` built
    if command -v "$1" >/dev/null; then command -v "$1"
    elif [[ -x "$2" ]]; then echo "$2"
    else echo "kind.sh: $1 is not on PATH and not built ($2); install it or run make cluster-bins" >&2; exit 1
    fi
}

need() {
    command -v "$1" >/dev/null || { echo "kind.sh: $1 is not on PATH: $2" >&2; exit 1; }
}

exists() { "$KIND" get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; }

up() {
    need "$DOCKER" "kind needs Docker (or set DOCKER/KIND for podman)"
    need "$KIND" "install kind: https://kind.sigs.k8s.io/docs/user/quick-start/"
    mkdir -p "$(dirname "$KUBECONFIG_FILE")"
    if exists; then
        echo "kind cluster $KIND_CLUSTER is already up"
    else
        "$KIND" create cluster --name "$KIND_CLUSTER" --config "$HERE/cluster.yaml" \
            --kubeconfig "$KUBECONFIG_FILE" ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait 120s
    fi
    "$KIND" export kubeconfig --name "$KIND_CLUSTER" --kubeconfig "$KUBECONFIG_FILE"
    echo "export KUBECONFIG=$KUBECONFIG_FILE"
}

deploy() {
    exists || { echo "kind.sh: no kind cluster $KIND_CLUSTER: run make kind-up first" >&2; exit 1; }
    local kubectl helm operator runtime tiny
    kubectl=$(tool "${KUBECTL:-kubectl}" "$CACHE_BIN/k8s-$K8S_VERSION/kubectl")
    helm=$(tool "${HELM:-helm}" "$CACHE_BIN/helm-$HELM_VERSION/helm")
    operator="$IMAGE_REPO/operator:$IMAGE_TAG"
    runtime="$IMAGE_REPO/runtime:$IMAGE_TAG"
    tiny="$IMAGE_REPO/runtime-tiny:$IMAGE_TAG"
    # `make kind-deploy` built the operator and runtime images (make images) before this.
    "$DOCKER" build -f "$REPO/images/runtime-tiny.Dockerfile" --build-arg "RUNTIME_IMAGE=$runtime" \
        -t "$tiny" "$REPO"
    "$KIND" load docker-image --name "$KIND_CLUSTER" "$operator" "$tiny"
    export KUBECONFIG="$KUBECONFIG_FILE"
    # Helm never upgrades CRDs: apply them first, as an upgrade must.
    "$kubectl" apply --server-side --force-conflicts -f "$CHART/crds/" \
        -f "$CHART/charts/kopf-peering/crds/"
    "$helm" upgrade --install "$RELEASE" "$CHART" --namespace "$RELEASE_NAMESPACE" --create-namespace \
        --values "$HERE/values-kind.yaml" \
        --set "image.repository=$IMAGE_REPO/operator" --set "image.tag=$IMAGE_TAG" \
        --set "runtime.image.repository=$IMAGE_REPO/runtime-tiny" --set "runtime.image.tag=$IMAGE_TAG" \
        --wait --timeout 180s
    "$kubectl" create namespace "$DEMO_NAMESPACE" --dry-run=client -o yaml | "$kubectl" apply -f -
    "$kubectl" apply -n "$DEMO_NAMESPACE" -f "$HERE/tiny.yaml"
    # The base first (its pod loads the model on the CPU), then every adapter on every replica.
    "$kubectl" wait -n "$DEMO_NAMESPACE" --for=condition=Ready bmd/tiny --timeout=600s
    "$kubectl" wait -n "$DEMO_NAMESPACE" --for=condition=Ready lora --all --timeout=300s
    "$kubectl" get loraplane -n "$DEMO_NAMESPACE"
    cat <<MSG

Deployed. Try it:
  export KUBECONFIG=$KUBECONFIG_FILE
  kubectl -n $DEMO_NAMESPACE port-forward svc/tiny-router 8000:8000 &
  curl localhost:8000/v1/completions -d '{"model": "poet", "prompt": "hello world, how are", "max_tokens": 16}'
The e2e suite on this cluster:
  LORAPLANE_USE_KUBECONFIG=1 KUBECONFIG=$KUBECONFIG_FILE make e2e
MSG
}

down() {
    need "$KIND" "install kind: https://kind.sigs.k8s.io/docs/user/quick-start/"
    if exists; then "$KIND" delete cluster --name "$KIND_CLUSTER"; else echo "no kind cluster $KIND_CLUSTER"; fi
    rm -f "$KUBECONFIG_FILE"
}

case "${1:-}" in
    up) up ;;
    deploy) deploy ;;
    down) down ;;
    kubeconfig) echo "$KUBECONFIG_FILE" ;;
    *) echo "usage: $0 up|deploy|down|kubeconfig" >&2; exit 2 ;;
esac
