"""Adapters: where they come from, whether they fit the base, and where they live (gpu/cpu/disk)."""

from loraplane.runtime.adapters.errors import AdapterError
from loraplane.runtime.adapters.manager import AdapterEntry, AdapterManager
from loraplane.runtime.adapters.names import check_name

__all__ = ["AdapterEntry", "AdapterError", "AdapterManager", "check_name"]
