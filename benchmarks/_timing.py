"""The benchmarks' one timer: the median wall time of repeated runs, after warm-up runs.

Imported as ``_timing`` (a script's own folder is first on ``sys.path``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1,
                sync: Callable[[], object] | None = None) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls; ``sync`` (e.g. CUDA's)
    runs before each clock reading, so queued device work is counted."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
