"""The systems the benchmarks measure sluice against (bench/kafka.py, bench/embedded.py)."""
