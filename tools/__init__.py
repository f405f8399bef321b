"""Research tooling around the method: sweeps and their comparison, speed and value-quality benchmarks.

Run from the repository root: `python -m tools.sweep ...`, or through eval.py (`compare`, `speed`, `values`,
`baselines`).
"""
