"""Adapters as the admin API reports them: the wire models the operator trusts as residency."""

from __future__ import annotations

from datetime import UTC, datetime

from loraplane.api.wire import AdapterInfo, RuntimeAdapterState, Tier, redact_source
from loraplane.runtime.adapters.entry import AdapterEntry, Loading


def describe_loading(name: str, inflight: Loading) -> AdapterInfo:
    """A load still fetching or validating: no weights yet, so nothing to report but that."""
    return AdapterInfo(
        name=name,
        source=redact_source(inflight.source),
        revision=inflight.revision,
        state=RuntimeAdapterState.LOADING,
        loading_since=_utc(inflight.started_at),
    )


def describe(entry: AdapterEntry) -> AdapterInfo:
    return AdapterInfo(
        name=entry.name,
        source=redact_source(entry.source),
        revision=entry.revision,
        sha256=entry.sha256,
        pinned=entry.pinned,
        state=RuntimeAdapterState(entry.state),
        tier=Tier(entry.tier),
        rank=entry.rank,
        target_modules=entry.target_modules,
        size_bytes=entry.size_bytes,
        loaded_at=_utc(entry.loaded_at),
        error=entry.error,
    )


def _utc(timestamp: float) -> datetime:
    # Whole seconds, as metav1.Time: the operator copies it into status.
    return datetime.fromtimestamp(int(timestamp), UTC)
