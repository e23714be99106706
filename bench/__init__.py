"""Benchmarks (`decmem bench ...`): one module per benchmark, common.py shared, figures.py draws, targets.py checks."""
