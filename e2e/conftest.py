"""The e2e suite (make e2e) runs on the same cluster fixtures as tests/cluster/."""

from e2e.cluster.fixtures import *  # noqa: F403
