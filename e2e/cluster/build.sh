#!/usr/bin/env bash
# Builds the local control plane's binaries from the Go module proxy into a cache keyed by
# version: $LORAPLANE_CACHE/bin/<tool>-<version>/. A second run is a no-op.
#
#   e2e/cluster/build.sh            build whatever is missing or stale
#   e2e/cluster/build.sh --force    rebuild everything
#   e2e/cluster/build.sh etcd kwok  only these (k8s, etcd, helm, kwok)
#
# Env: LORAPLANE_CACHE (default ~/.cache/loraplane), GO (default: go on PATH, else
# /usr/local/go/bin/go), LORAPLANE_BUILD_JOBS (go build -p; default: number of CPUs).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${LORAPLANE_CACHE:-$HOME/.cache/loraplane}"
bindir="$cache/bin"
force=0
targets=()
for a in "$@"; do
  case "$a" in
    --force) force=1 ;;
    k8s|etcd|helm|kwok) targets+=("$a") ;;
    *) echo "build.sh: unknown argument $a (--force, k8s, etcd, helm, kwok)" >&2; exit 2 ;;
  esac
done
[[ ${#targets[@]} -eq 0 ]] && targets=(etcd kwok helm k8s)

if [[ -z "${GO:-}" ]]; then
  GO="$(command -v go || true)"
  [[ -z "$GO" && -x /usr/local/go/bin/go ]] && GO=/usr/local/go/bin/go
fi
if [[ -z "$GO" ]]; then
  echo "build.sh: no Go toolchain found; install Go >= 1.26 or set GO=/path/to/go" >&2
  exit 1
fi
# Never let a go.mod's `go` line trigger a toolchain download; no cgo, like upstream releases.
export GOTOOLCHAIN=local CGO_ENABLED=0
jobs="${LORAPLANE_BUILD_JOBS:-$(nproc)}"
go_version="$("$GO" env GOVERSION)"

log() { printf '[build %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# The stamp says what a cached folder was built from; any change to it means rebuild.
stamp_of() {  # stamp_of <tool> <version> [files...]
  local tool="$1" version="$2"; shift 2
  { echo "$tool $version $go_version"; if [[ $# -gt 0 ]]; then cat "$@"; fi; } | sha256sum | cut -c1-16
}

fresh() {  # fresh <dir> <stamp>: the folder is complete and built from these inputs
  [[ $force == 0 && -f "$1/.stamp" && "$(cat "$1/.stamp")" == "$2" ]]
}

# Build into a temporary folder and rename it into place, so an interrupted build never
# leaves a half-filled cache that later runs would trust.
publish() {  # publish <tmpdir> <dir> <stamp>
  echo "$3" > "$1/.stamp"
  chmod 755 "$1"
  rm -rf "$2.old"
  [[ -d "$2" ]] && mv "$2" "$2.old"
  mv "$1" "$2"
  rm -rf "$2.old"
}

check_pin() {  # the tool module must pin what versions.env says
  local moddir="$1" module="$2" want="$3" got
  got="$(cd "$moddir" && "$GO" list -m -f '{{.Version}}' "$module")"
  if [[ "$got" != "$want" ]]; then
    echo "build.sh: $moddir/go.mod pins $module $got but versions.env says $want; make them agree" >&2
    exit 1
  fi
}

build_k8s() {
  local moddir="$here/tools/k8s" dir="$bindir/k8s-$K8S_VERSION"
  local stamp; stamp="$(stamp_of k8s "$K8S_VERSION" "$moddir/go.mod" "$moddir/go.sum")"
  fresh "$dir" "$stamp" && { log "k8s $K8S_VERSION cached in $dir"; return; }
  check_pin "$moddir" k8s.io/kubernetes "$K8S_VERSION"
  local minor; minor="$(cut -d. -f2 <<<"$K8S_VERSION")"
  # Stamp the version as upstream's hack/lib/version.sh does; unstamped binaries report
  # v0.0.0-master and kubectl warns about skew.
  local ld="-s -w" p date; date="$(date -u +%FT%TZ)"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  local tmp; tmp="$(mktemp -d "$bindir/.k8s.XXXXXX")"
  log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl $K8S_VERSION (-p $jobs)"
  (cd "$moddir" && "$GO" build -p "$jobs" -trimpath -ldflags "$ld" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
  publish "$tmp" "$dir" "$stamp"
  log "k8s $K8S_VERSION -> $dir"
}

build_etcd() {
  local moddir="$here/tools/etcd" dir="$bindir/etcd-$ETCD_VERSION"
  local stamp; stamp="$(stamp_of etcd "$ETCD_VERSION" "$moddir/go.mod" "$moddir/go.sum")"
  fresh "$dir" "$stamp" && { log "etcd $ETCD_VERSION cached in $dir"; return; }
  check_pin "$moddir" go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
  local tmp; tmp="$(mktemp -d "$bindir/.etcd.XXXXXX")"
  log "building etcd $ETCD_VERSION"
  # -o names the file: the package's directory is `server`, which would be the default name.
  (cd "$moddir" && "$GO" build -p "$jobs" -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
  publish "$tmp" "$dir" "$stamp"
  log "etcd $ETCD_VERSION -> $dir"
}

# helm and kwok carry no replaces, so `go install pkg@version` builds them outside any
# module, with the versions and checksums their own go.mod and go.sum pin.
build_helm() {
  local dir="$bindir/helm-$HELM_VERSION"
  # As helm's own Makefile does: without it `helm template` and `helm lint` assume
  # Kubernetes v1.20 and refuse a chart whose kubeVersion asks for more.
  local minor; minor="$(cut -d. -f2 <<<"$K8S_VERSION")"
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" p
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ld+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$minor"
  done
  local stamp; stamp="$(stamp_of helm "$HELM_VERSION" <(echo "$ld"))"
  fresh "$dir" "$stamp" && { log "helm $HELM_VERSION cached in $dir"; return; }
  local tmp; tmp="$(mktemp -d "$bindir/.helm.XXXXXX")"
  log "building helm $HELM_VERSION (default Kubernetes 1.$minor)"
  (cd "$tmp" && GOBIN="$tmp" "$GO" install -p "$jobs" -trimpath -ldflags "$ld" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION")
  publish "$tmp" "$dir" "$stamp"
  log "helm $HELM_VERSION -> $dir"
}

repo="$(cd "$here/../.." && pwd)"
repo_stages() {  # the repo's own stage files kwok-stages.txt names (./path from the repo root)
  local f
  while read -r f; do [[ "$f" == ./* ]] && echo "$repo/$f"; done < "$here/kwok-stages.txt"
  return 0
}

build_kwok() {
  local dir="$bindir/kwok-$KWOK_VERSION"
  local stamp; stamp="$(stamp_of kwok "$KWOK_VERSION" "$here/kwok-stages.txt" $(repo_stages))"
  fresh "$dir" "$stamp" && { log "kwok $KWOK_VERSION cached in $dir"; return; }
  local tmp; tmp="$(mktemp -d "$bindir/.kwok.XXXXXX")"
  log "building kwok $KWOK_VERSION"
  (cd "$tmp" && GOBIN="$tmp" "$GO" install -p "$jobs" -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION")
  # kwok 0.8 ships no built-in stages; take the ones we use from its module source, which
  # `go install` just put in the module cache, and keep them beside the binary.
  local src; src="$(cd "$tmp" && "$GO" mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" \
    | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
  local f
  : > "$tmp/stages.yaml"
  while read -r f; do
    [[ -z "$f" || "$f" == \#* ]] && continue
    if [[ "$f" == ./* ]]; then  # our own stage, from this repo
      [[ -f "$repo/$f" ]] || { echo "build.sh: kwok-stages.txt names $f, not in $repo" >&2; exit 1; }
      { echo "---"; cat "$repo/$f"; } >> "$tmp/stages.yaml"
      continue
    fi
    [[ -f "$src/$f" ]] || { echo "build.sh: kwok $KWOK_VERSION has no $f" >&2; exit 1; }
    { echo "---"; cat "$src/$f"; } >> "$tmp/stages.yaml"
  done < "$here/kwok-stages.txt"
  publish "$tmp" "$dir" "$stamp"
  log "kwok $KWOK_VERSION -> $dir"
}

mkdir -p "$bindir"
# One build at a time: CI and a developer may share the cache.
exec 9>"$bindir/.lock"
flock 9
rm -rf "$bindir"/.k8s.* "$bindir"/.etcd.* "$bindir"/.helm.* "$bindir"/.kwok.*

start=$SECONDS
for t in "${targets[@]}"; do "build_$t"; done
log "done in $((SECONDS - start))s"
