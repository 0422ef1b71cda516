"""Timing shared by the benchmarks: ours and the peer alternate, so machine noise hits both; medians are reported."""

import statistics
import time


def interleaved(fns: dict, rounds: int = 5, warmup: int = 1) -> dict:
    """Seconds per call (median over `rounds`) of each function, calling them in turn every round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}
