"""Benchmarks (scripts, not tests): ``python -m bench.<name>``; figures and commands are in BENCHMARKS.md."""
