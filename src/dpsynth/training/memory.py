"""Handing freed host memory back to the operating system between training steps.

DP-SGD's Poisson batches change size at every step, so the tensors of one step rarely fit the
holes the last step's left in glibc's heap: freed memory stays mapped and the resident set
grows step after step (the CVAE demo's fine-tune went from 1.3 GB after its first step to
2.9 GB after 117; with a trim at each step it stays near 0.85 GB). `malloc_trim(0)` returns
the free pages; elsewhere than glibc (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the OS; True when it could be asked (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
