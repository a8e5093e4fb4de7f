#!/usr/bin/env bash
# The local control plane: up | down | status | kubeconfig | kubectl | logs <component>.
# The work is done by `python -m e2e.cluster`; this only picks the interpreter.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="$repo/.venv/bin/python"
[[ -x "$python" ]] || python="$(command -v python3)"
cd "$repo"
exec "$python" -m e2e.cluster "$@"
