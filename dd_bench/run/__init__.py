"""Running suites: the suite schema and its grid of cells, executors (local, Ray Tune), shared
artifacts, the result store, and measurement (timers, peak memory, environment, CPU allocator)."""
