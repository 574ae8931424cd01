"""Peak memory: the benchmarks' (scripts/bench.py, scripts/bench_loss.py), the peak of one call beyond what was
allocated before it; a training run's (RunLog's max_memory_mb), the peak of each logged window. CUDA: the caching
allocator's counters; CPU: the process's resident memory."""
import contextlib
import ctypes
import functools
import gc
import resource
import sys

import torch


def process_memory(field):
    """MiB of this process from /proc/self/status (Linux): VmRSS now, VmHWM the peak since the last reset."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


@functools.cache
def _libc():
    return ctypes.CDLL("libc.so.6")  # (OSError where there is no glibc)


class _Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2 (2.33 and later), fields in its order
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def release_freed(keep_mb=256):
    """Give back to the system what malloc holds free in its heap, once that passes keep_mb (glibc; elsewhere
    nothing): data.on_device's CPU passes, when many micro-batches wait (docs/speed.md)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc, or older than 2.33
        libc = _libc()
        libc.mallinfo2.restype = _Mallinfo2
        if libc.mallinfo2().fordblks > keep_mb * 2 ** 20:  # (a fraction of a microsecond)
            libc.malloc_trim(0)


def peak_memory(fn, device):
    """MiB allocated at the peak of fn() beyond what was allocated before it. On a CPU (Linux, glibc), so that the
    resident peak is the peak of live tensors, every allocation of 64 KiB or more is mapped and unmapped on its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2 ** 20
    libc = _libc()
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB (and no dynamic raising of it)
    libc.malloc_trim(0)  # memory freed earlier, still in malloc's heap, goes back too: reused, it counts again
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = process_memory("VmRSS")
    fn()
    return process_memory("VmHWM") - start


def window_peak(device):
    """MiB at the peak since the last call (or the start), then the peak reset, for the next window. CUDA: what the
    caching allocator hands out, not what it holds (a host-side counter, no device sync). CPU: this process's, not
    its DataLoader workers'; where /proc is missing or cannot be written, the peak since the process started."""
    if str(device).startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    try:
        peak = process_memory("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak
    except (OSError, StopIteration, ValueError):  # not Linux, or /proc hidden or read-only
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
        return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)
