"""Give freed heap memory back to the OS during long streaming loops (archive, export).

Streaming tens of millions of COPY rows allocates and frees many buffers of a few MiB; glibc's malloc
raises its mmap threshold after such frees and then serves them from the heap, which fragments and is
not returned: measured on a 3M-row archive, RSS grew by ~65 MB per 40 batches of 16 MiB without trimming
and stayed flat with ``malloc_trim(0)`` every few batches. The call costs well under a millisecond.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl, not macOS)
    except OSError:
        return None


def release_free_memory() -> bool:
    """``malloc_trim(0)`` where glibc provides it; True if memory was released."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
