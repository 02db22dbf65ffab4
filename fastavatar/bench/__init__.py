"""Benchmark logic behind ``scripts/benchmark_*.py``: each returns a JSON-serialisable dict of
figures (speed targets live here and in the scripts, never in unit tests)."""
