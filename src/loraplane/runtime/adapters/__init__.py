"""Adapters: where they come from, whether they fit the base, and where they live (gpu/cpu/disk).

Nothing is imported here: the HTTP process imports errors.py alone, and must not pay for
torch (manager.py) to do it.
"""
