"""vmconfine's benchmarks (see docs/performance.md): ``python -m bench.run [--quick]``."""
