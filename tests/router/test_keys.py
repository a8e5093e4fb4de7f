"""API keys from a Secret: open without it, closed with it (even when it holds no key)."""

from __future__ import annotations

import base64

from loraplane.router.keys import Access, keys_of


def secret(**values: str) -> dict:
    return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}}


def test_no_secret_is_open_and_a_secret_admits_only_its_keys() -> None:
    access = Access("tiny-api-keys")
    assert access.open and access.allows(None)
    access.update(secret(team_a="key-a", team_b="key-b\n"))
    assert not access.open
    assert access.allows("Bearer key-a") and access.allows("bearer key-b")
    assert not access.allows(None) and not access.allows("Bearer key-c")
    assert not access.allows("key-a") and not access.allows("Basic key-a")
    access.update(None)  # deleted: open again, as documented
    assert access.allows(None)


def test_a_secret_without_usable_values_refuses_everyone() -> None:
    assert keys_of({"data": {}}) == frozenset()
    assert keys_of({"data": {"bad": "***not base64***", "blank": ""}}) == frozenset()
    access = Access("tiny-api-keys")
    access.update({})
    assert not access.allows("Bearer ")
    assert not access.allows("Bearer anything")
