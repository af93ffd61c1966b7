"""Benchmarks: an HTTP load generator (bench.load) and an in-process stage profiler
(bench.profile_stages). See bench/README.md."""
