"""Benchmarks behind `raeflow bench ...` (see BENCHMARKS.md)."""
