"""Benchmarks: each module's `main() -> dict` measures a ratio against a baseline run in the same process."""
