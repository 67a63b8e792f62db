"""Timing helpers shared by the Python benches: CUDA-event medians and the copy-bandwidth ceiling."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], warmup: int = 5, repeat: int = 30) -> tuple[float, float]:
    """Median and (max - min) spread in milliseconds of ``fn`` over ``repeat`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), max(times) - min(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), measured now."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms, _ = median_ms(lambda: dst.copy_(src), warmup=3, repeat=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9
