"""glibc malloc settings for the servers' large, short-lived buffers.

A leader ships its records to each follower in messages of about 1 MiB, each a fresh
bytes object, and gRPC copies it again; AppendStream messages and read batches are
alike. Above glibc's mmap threshold (128 KiB until it adapts) every such buffer is
mapped and unmapped on its own, and each of its pages faults and is zeroed again.
Measured on this machine: writing 200 MiB on a gRPC stream as fresh 1 MiB messages cost
0.34-0.37 s of CPU, 0.10-0.12 s with these settings; a 3-region replicated ingest gained
about 5% (3 alternated runs), standalone ingest about nothing. The price: up to
TRIM_THRESHOLD of freed memory stays in the process, for reuse, instead of going back
to the system at once.

An operator's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (glibc's environment
variables) win: nothing is changed then.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 32 << 20  # allocations below this come from the heap, reused
TRIM_THRESHOLD = 64 << 20  # free memory kept at the heap's top before it is returned
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def keep_large_buffers() -> bool:
    """Applies the settings to this process; False where they were not applied (not
    glibc, or the operator set glibc's variables)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
