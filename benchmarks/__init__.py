"""Benchmarks: ``python -m benchmarks [--quick] [--json PATH]`` (see README.md)."""
