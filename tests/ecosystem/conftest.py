"""Images, kind, dashboards, GitOps and security: the pieces loraplane ships around its code."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # e2e/ is tooling, not an installed package
    sys.path.insert(0, str(REPO))

from e2e.cluster.fixtures import helm_bin  # noqa: E402, F401
