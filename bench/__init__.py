"""Benchmark scripts (not tests): run ``make bench`` or ``python -m bench.<script> --help``."""
