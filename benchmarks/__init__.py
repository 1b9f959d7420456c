"""Speed benchmarks (pytest-benchmark) and their report; see benchmarks/README.md."""
