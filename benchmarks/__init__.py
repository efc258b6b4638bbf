"""Benchmarks: cpu.py (ratios measured in one run on this machine) and gpu.py (the one prepared GPU run).
Both start from the top-level bench.py: `python bench.py [--only=...]` and `python bench.py --gpu`."""
