"""The reproduction report: each paper's claim read against the project's CPU-scale comparison.

    python -m simulations.reproduce --compare benchmarks/results/compare \
        --output benchmarks/results/reproduce/REPORT.md

Reads ``compare.csv`` and ``tuning.csv`` (written by ``fedlowrank compare``) and ``claims.toml`` beside this file.
For each claim "A beats B": the paired difference A − B over the shared seeds with its 95 % interval and p-value,
and a verdict: *reproduces* (same direction, p < 0.05), *same direction, not significant*, *reversed* (the
opposite direction, p < 0.05), or *not run* (a method missing from the comparison). Beside it, what was measured
that bears on why: each method's validation accuracy over the tuned grid (its learning-rate sensitivity) and
whether the chosen setting sits at the edge of the grid.
"""
