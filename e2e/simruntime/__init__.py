"""A light simulated runtime: one process answers the runtime's HTTP contract for many kwok pods."""
