"""Adapter names are DNS-1123 subdomains: safe as a path component, a label and a model id."""

from __future__ import annotations

import re

from loraplane.runtime.adapters.errors import InvalidName

_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def check_name(name: str) -> str:
    if not name or len(name) > 253 or not _DNS1123.match(name):
        raise InvalidName(
            f"adapter name {name!r} is not a DNS-1123 subdomain: use at most 253 lowercase "
            "letters, digits, '-' and '.', starting and ending with a letter or digit"
        )
    return name
