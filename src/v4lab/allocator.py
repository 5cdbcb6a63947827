"""Keep freed memory in the process, so a training step does not page-fault its tensors in.

A training step allocates and frees the same few hundred tensors every step, many of them
a few MB (the sparse-MLA scores and masks are [B, H, T, T]). glibc's malloc serves blocks
above its mmap threshold (128 KiB at start, rising only as far as the largest mmapped block
freed so far) with fresh ``mmap``s, and hands the free top of its heap back to the kernel
once it exceeds the trim threshold (twice the mmap threshold). Either way the next step's
tensors land on pages the kernel must map and zero again, one 4 KiB page at a time: the
full model at the study size (8 x 256) took about 39,000 minor page faults per step.

:func:`retain_freed_memory` fixes both thresholds high (``mallopt``), so steady-state
steps reuse the heap they already hold: about 3,000 faults per step, and the step 11-13%
faster at one thread (``benchmarks/results/allocator.md``). The price is resident memory: the process keeps
its peak heap (capped by the trim threshold's 1 GiB of free heap top) instead of returning
it between steps.

Values do not change: torch's CPU allocator aligns every tensor to 64 bytes whichever way
malloc serves it, so every kernel sees the same data at the same alignment
(``tests/test_allocator.py`` trains the same step bit-identically under both policies).

Applied when v4lab is imported, unless the environment names an allocator policy of its
own (any variable in ``USER_POLICY``: glibc's ``MALLOC_*``/``GLIBC_TUNABLES``, a preloaded
allocator) or ``V4LAB_SYSTEM_MALLOC`` is set, to keep glibc's defaults. Nothing happens
outside glibc (macOS, musl).

Bottom layer: standard library only.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLD = 256 << 20  # blocks above this still get their own mmap (rare, huge tensors)
TRIM_THRESHOLD = 1 << 30  # free heap top kept before any of it goes back to the kernel
USER_POLICY = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
               "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES", "LD_PRELOAD", "V4LAB_SYSTEM_MALLOC")


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (the only one whose ``mallopt`` this sets), else None."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (ValueError, OSError, AttributeError):  # no confstr name / no libc.so.6
        return None


def retain_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Set glibc's mmap and trim thresholds (see the module doc). Returns whether it did:
    False outside glibc or when the environment names an allocator policy of its own."""
    env = os.environ if environ is None else environ
    if any(key in env for key in USER_POLICY):
        return False
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
