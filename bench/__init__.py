"""Benchmarks run side by side with the tools labrelay replaces; see docs/benchmarks.md."""
