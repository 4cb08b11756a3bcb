"""Benchmarks: ``python -m benchmarks.bench_engine`` (see README.md)."""
