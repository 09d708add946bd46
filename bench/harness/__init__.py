"""The benchmark's parts by job: bench/bench.py composes them (see bench/README.md)."""
