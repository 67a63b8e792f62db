"""What the Python kernel benches share: CUDA-event medians, the copy-bandwidth ceiling and the
command-line flags every one of them takes.

Every timed run is preceded by a write over a buffer larger than the L2 cache, queued on the same
stream, then about 1 ms of GPU spin. The write makes the kernel start with a cold L2 (its inputs are
not served from the previous repeat's cache, which would flatter a 30 MB input on a 50 MB L2). The
spin keeps the GPU busy while the host queues the start event and every launch of the timed call, so
the launch cost on the host (Python, the binding) stays out of the GPU time measured between the
events even for a call of several short launches (the chunked cross-entropy forward: 8 launches of
about 40 us, whose figure varied between 71% and 80% of the copy when the write alone had to cover
the host's queueing). Launch cost is real but is a separate figure
(``host_launch_us``); kernels compared with a copy ceiling are compared on GPU time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

# Larger than any current GPU's L2 (H100/H200: 50 MB, B200: 126 MB).
_FLUSH_BYTES = 256 << 20
_flush_buf: torch.Tensor | None = None
# GPU clock cycles of spin after the flush: about 1 ms at H200 clocks, longer than the host needs to
# queue any timed call here.
_SPIN_CYCLES = 2_000_000


def _flush_l2() -> None:
    global _flush_buf
    if _flush_buf is None:
        _flush_buf = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    _flush_buf.zero_()


def median_ms(fn: Callable[[], object], warmup: int = 5, repeat: int = 30) -> tuple[float, float]:
    """Median and (max - min) spread in milliseconds of ``fn``'s GPU time over ``repeat`` runs.

    Each run starts after an L2 flush queued just before it (see the module docstring).
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _flush_l2()
        torch.cuda._sleep(_SPIN_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), max(times) - min(times)


def host_launch_us(fn: Callable[[], object], repeat: int = 200) -> float:
    """Median host time in microseconds to queue one call of ``fn`` (GPU kept busy meanwhile)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        torch.cuda._sleep(2_000_000)  # ~1 ms of GPU spin so the queue never drains under us
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), measured now."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms, _ = median_ms(lambda: dst.copy_(src), warmup=3, repeat=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def gpu_bench_args(
    parser: argparse.ArgumentParser, script: str, *, repeat: int, out: str, only_help: str
) -> argparse.Namespace | None:
    """Adds the flags every kernel bench takes (``--repeat``, ``--out``, ``--only``) to ``parser`` and
    parses the command line; None, after saying so, where there is no CUDA GPU to time on."""
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--out", default=out)
    parser.add_argument("--only", default="", help=only_help)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"{script} needs a CUDA GPU")
        return None
    return args
