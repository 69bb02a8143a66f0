"""glibc's allocator, told to give memory back: freed heap pages and large temporaries return to the OS."""

from __future__ import annotations

import ctypes


def malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and RSS creeps up layer by layer)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def fix_malloc_mmap_threshold(nbytes: int = 4 << 20) -> None:
    """Serve every allocation of ``nbytes`` or more with its own mmap, returned to the OS when freed.

    glibc raises this threshold (up to 32 MB) each time a large block is freed, after which the
    solver's 4-32 MB temporaries come from the heap and fragment it: each layer's peak then creeps
    up (8 layers of a 1024-wide model: 704 -> 803 MB; flat at about 670 MB with the fixed
    threshold). Process-wide; a no-op where libc is not glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
