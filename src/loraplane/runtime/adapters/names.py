"""Adapter names follow the one grammar in loraplane.api.wire, shared with LoraAdapter.servedName."""

from __future__ import annotations

from loraplane.api.wire import adapter_name_problem
from loraplane.runtime.adapters.errors import InvalidName


def check_name(name: str) -> str:
    problem = adapter_name_problem(name)
    if problem is not None:
        raise InvalidName(problem)
    return name
