"""Timing shared by the benchmark scripts."""

import statistics
import time

import jax


def median_seconds(fn, *args, repeats: int) -> float:
  """Median wall time of fn(*args) over `repeats` calls, after one call that
  compiles and warms up; JAX results are waited for."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)
