"""Helpers for tests, benchmarks and demos; never imported by the node itself."""
