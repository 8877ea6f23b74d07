"""Benchmark runner and recorded results."""
