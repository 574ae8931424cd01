"""
Memory as the benchmarks measure it (scripts/bench.py, scripts/bench_loss.py): the peak of one call, beyond what was
allocated before it, on CUDA from the caching allocator's counters, on a CPU from the process's resident memory.
"""
import ctypes
import gc

import torch


def process_memory(field):
    """MiB of this process from /proc/self/status (Linux): VmRSS now, VmHWM the peak since the last reset."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def peak_memory(fn, device):
    """MiB allocated at the peak of fn() beyond what was allocated before it. CUDA: the caching allocator's own
    counters. CPU (Linux, glibc): the process's peak resident memory, reset through /proc/self/clear_refs, with
    every allocation of 64 KiB or more mapped and unmapped on its own (mallopt M_MMAP_THRESHOLD) and malloc's free
    memory returned (malloc_trim), so that the resident peak is the peak of live tensors."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2 ** 20
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB (and no dynamic raising of it)
    libc.malloc_trim(0)  # memory freed earlier, still in malloc's heap, goes back too: reused, it counts again
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = process_memory("VmRSS")
    fn()
    return process_memory("VmHWM") - start
