"""Benchmarks (`make bench`): raw runtimes, the running system, and the naive baseline."""
