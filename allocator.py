"""glibc malloc's mmap threshold, set from inside the process on CPU runs (config key cpu_malloc_mmap_threshold).

    from allocator import set_malloc_mmap_threshold
    set_malloc_mmap_threshold(131072)   # before the models load: every block ≥ 128 KiB gets its own mapping

Why: on CPU, tensors live in malloc's memory. glibc raises its mmap threshold dynamically each time a mapped block is
freed (up to 32 MiB on 64-bit), so after the first freed activation most tensors come from the heap, where freed
blocks fragment it instead of returning to the system. peft's LoRA layers (base(x) + B(A(x))·α/r: three freed
temporaries of a layer's output size per layer) made a LoRA DPO step of SmolLM2-135M hold as much resident memory
as a full-weight one (benchmarks/README.md). A fixed threshold gives every larger block its own mapping, unmapped
when freed. glibc's mallopt(3): "M_MMAP_THRESHOLD ... Setting this parameter also disables dynamic adjustment",
the same as the MALLOC_MMAP_THRESHOLD_ environment variable, which this replaces.
"""
import ctypes
import ctypes.util
from typing import Optional

# <malloc.h>: #define M_MMAP_THRESHOLD -3 (mallopt(3))
M_MMAP_THRESHOLD = -3


def glibc() -> Optional[ctypes.CDLL]:
    """The process's C library if it is glibc (it has gnu_get_libc_version), else None (macOS, musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.gnu_get_libc_version  # AttributeError outside glibc
        return libc
    except (OSError, AttributeError):
        return None


def set_malloc_mmap_threshold(threshold: Optional[int]) -> Optional[str]:
    """Set glibc's M_MMAP_THRESHOLD to `threshold` bytes (None: leave malloc as it is). Returns a note for the log when
    nothing was set although asked (no glibc, or mallopt refused the value), else None."""
    if threshold is None:
        return None
    libc = glibc()
    if libc is None:
        return f'cpu_malloc_mmap_threshold={threshold}: not glibc malloc here, left as it is'
    if libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold)) != 1:  # mallopt returns 1 on success
        return f'cpu_malloc_mmap_threshold={threshold}: glibc mallopt refused it (at most 32 MiB), left as it is'
    return None
