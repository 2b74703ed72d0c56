"""Kernel benchmark pieces behind tools/bench_kernels.py: inputs and timing (common), baselines,
the reference check, one timed case, launch-config tuning, and the markdown report."""
