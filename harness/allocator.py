"""The C allocator of a run process: freed memory kept for the next step, not handed back.

glibc's malloc serves a large block (above a threshold that starts at 128 KiB) with its own
``mmap`` and returns it to the kernel when freed. A training step allocates and frees the same
large tensors every step — activations, their gradients, a pooling layer's zero-filled input
gradient — so every step pays the kernel again for fresh pages: on the paper's FashionMNIST
CNN (batch 64, one thread, this machine's AMD EPYC) zeroing max-pooling's 9.4 MB input gradient
took 7.1 ms of BP's 42.8 ms step, nearly all of it page faults. Raising the mmap threshold to
glibc's largest (32 MiB) and the trim threshold far above what a run frees makes those blocks
come from the heap and stay there for reuse: BP's step on that CNN ran 25–27% faster, FA's
10–30%, DLL's 8–15%, PC's 1–20% (benchmarks/bench_allocator.py measures it).

Nothing computed changes: the same operations run on memory obtained elsewhere (runs re-run with
it give every number equal, see the commit that added this). What changes is the process's
memory: freed blocks are kept, so a run's peak RSS can be somewhat higher. Each run records
that it ran so (its notes' ``malloc``), and ``BENCH_MALLOC=default`` leaves glibc as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional

M_TRIM_THRESHOLD = -1       # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024      # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30
_state: dict[str, Optional[str]] = {}


def keep_freed_memory() -> Optional[str]:
    """Set this process's glibc malloc to keep freed blocks (once); the setting in words, for a
    run's notes, or None where it is not glibc or ``BENCH_MALLOC=default`` says not to."""
    if "done" in _state:
        return _state["done"]
    setting = None
    if os.environ.get("BENCH_MALLOC", "").strip().lower() != "default":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):         # not glibc (macOS, musl): nothing to set
            mallopt = None
        if mallopt is not None:
            mmap = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            trim = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            parts = ([f"glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB"] if mmap else []) + \
                ([f"trim threshold {TRIM_THRESHOLD >> 20} MiB"] if trim else [])
            if parts:
                setting = ", ".join(parts) + (" (freed memory kept)" if mmap and trim else
                                              " (only this part set)")
    _state["done"] = setting
    return setting
