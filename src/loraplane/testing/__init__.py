"""Builders for tiny models and adapters: the tests, the demo and the benchmarks share them."""
