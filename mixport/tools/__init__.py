"""Checks and benchmarks over export folders (parity, timing)."""
