"""SimConfig: how the simulated runtime finds its pods and how its adapters load or fail."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from loraplane.api.wire import AdapterErrorCode

# The status the real runtime answers with each refusal (runtime/adapters/errors.py; importing
# that module would import torch). tests/cluster/test_simruntime_units.py checks they agree.
ERROR_STATUS: dict[AdapterErrorCode, int] = {
    AdapterErrorCode.INVALID_NAME: 400,
    AdapterErrorCode.NOT_FOUND: 404,
    AdapterErrorCode.SOURCE_NOT_FOUND: 404,
    AdapterErrorCode.SOURCE_UNREACHABLE: 502,
    AdapterErrorCode.INVALID_SOURCE: 400,
    AdapterErrorCode.INVALID_ADAPTER: 422,
    AdapterErrorCode.INCOMPATIBLE: 422,
    AdapterErrorCode.CHECKSUM_MISMATCH: 422,
    AdapterErrorCode.CONFLICT: 409,
    AdapterErrorCode.SOURCE_TOO_LARGE: 422,
    AdapterErrorCode.SOURCE_TIMEOUT: 504,
    AdapterErrorCode.TOO_MANY_FETCHES: 429,
    AdapterErrorCode.INSUFFICIENT_STORAGE: 507,
    AdapterErrorCode.SHUTTING_DOWN: 503,
}

# A source with a path segment `fail-<code>` (file:///adapters/fail-incompatible/sql) is refused
# with that code on every pod: failure paths need no configuration.
FAIL_SEGMENT = re.compile(r"/fail-(?P<code>[a-z_]+)")


@dataclass(frozen=True)
class FailRule:
    """Loads whose source contains `pattern` (a regular expression) fail with `code`."""

    pattern: str
    code: AdapterErrorCode

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"--fail {self.pattern!r}: not a regular expression: {e}") from None

    @classmethod
    def parse(cls, text: str) -> FailRule:
        """PATTERN=CODE, e.g. `-big-=incompatible`."""
        pattern, sep, code = text.rpartition("=")
        if not sep or not pattern:
            raise ValueError(f"--fail {text!r}: write PATTERN=CODE, e.g. '-big-=incompatible'")
        try:
            return cls(pattern, AdapterErrorCode(code))
        except ValueError:
            codes = ", ".join(c.value for c in AdapterErrorCode)
            raise ValueError(
                f"--fail {text!r}: unknown code {code!r}; use one of {codes}"
            ) from None


@dataclass(frozen=True)
class SimConfig:
    runtime_command: str = "loraplane-runtime"
    """A pod is a runtime pod when its container's command starts with this (its basename)."""
    namespaces: tuple[str, ...] = ()
    """Namespaces whose pods to serve; empty: every namespace."""
    default_port: int = 8000
    """The runtime's port when the container has neither --port nor a port named http."""
    load_seconds: float = 0.05
    """Simulated fetch and read of one adapter: a PUT answers after this long."""
    completion_seconds: float = 0.0
    """How long one completion request is in flight (the in-flight gauge counts it)."""
    fail_rules: tuple[FailRule, ...] = field(default_factory=tuple)
    add_routes: bool = False
    """Make unbindable pod IPs bindable (ip route add local <ip>/16 dev lo, as root); the
    routes are removed at exit."""
    lifetime_seconds: float = 7200.0
    """The process stops by itself after this long, however it was started."""

    def __post_init__(self) -> None:
        for name in ("load_seconds", "completion_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.lifetime_seconds <= 0:
            raise ValueError(f"lifetime_seconds must be positive, got {self.lifetime_seconds}")
        if not 0 < self.default_port < 65536:
            raise ValueError(f"default_port {self.default_port} is not a port")
        if not self.runtime_command or "/" in self.runtime_command:
            raise ValueError(
                f"runtime_command {self.runtime_command!r}: give the command's basename, "
                "e.g. loraplane-runtime"
            )

    def failure_for(self, source: str) -> tuple[AdapterErrorCode, str] | None:
        """The code a load of source fails with, and the rule that says so; None: it loads."""
        for rule in self.fail_rules:
            if re.search(rule.pattern, source):
                return rule.code, f"--fail {rule.pattern}={rule.code.value}"
        m = FAIL_SEGMENT.search(source)
        if m is None:
            return None
        try:
            return AdapterErrorCode(m["code"]), f"its path segment {m[0][1:]!r}"
        except ValueError:
            return AdapterErrorCode.INVALID_ADAPTER, f"its path segment {m[0][1:]!r} (unknown code)"
