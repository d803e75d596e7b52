"""Benchmarks: every figure beside its anchor, measured in the same run (`make bench`)."""
