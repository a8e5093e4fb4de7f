"""The developer cache: built tools (e2e/cluster/build.sh) and demo models, shared by every clone."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# The same name is read by the Makefile and the e2e scripts, which cannot import it. It is
# neither the runtime's LORAPLANE_CACHE_DIR (one process's adapter downloads) nor the
# operator's LORAPLANE_CACHE_ROOT (where runtime pods keep theirs): those live in a pod.
DEV_CACHE_ENV = "LORAPLANE_CACHE"


def dev_cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get(DEV_CACHE_ENV) or Path.home() / ".cache" / "loraplane")
