"""API keys: the values of one Secret per deployment; without that Secret the router is open."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)
BEARER = "bearer "


def keys_of(secret: Mapping[str, Any] | None) -> frozenset[bytes] | None:
    """The keys a Secret holds (each of its values, any key name); None when there is no Secret.

    A Secret with no usable value gives an empty set: every request is refused, not let in.
    """
    if secret is None:
        return None
    keys = set()
    for name, value in (secret.get("data") or {}).items():  # the API returns data, base64
        try:
            raw = base64.b64decode(value, validate=True).strip()
        except (binascii.Error, ValueError):
            log.warning("value %r of the API keys Secret is not base64; ignored", name)
            continue
        if raw:
            keys.add(raw)
    return frozenset(keys)


class Access:
    """Who may send requests: anyone while no keys Secret exists, else holders of a key."""

    def __init__(self, secret_name: str) -> None:
        self.secret_name = secret_name
        self.keys: frozenset[bytes] | None = None

    def update(self, secret: Mapping[str, Any] | None) -> None:
        self.keys = keys_of(secret)

    @property
    def open(self) -> bool:
        return self.keys is None

    def allows(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries one of the keys (compared in constant time)."""
        if self.keys is None:
            return True
        if not authorization or not authorization.lower().startswith(BEARER):
            return False
        given = authorization[len(BEARER) :].strip().encode()
        # Every key is compared, so the time taken says nothing about which one came close.
        return sum(hmac.compare_digest(given, key) for key in self.keys) > 0
