"""Benchmarks of the bridge against the fakes on loopback: run with `python -m bench.run`."""
