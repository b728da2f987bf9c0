"""One BLAS thread for small blocks: the Hessian work on narrow diagonal blocks runs faster without OpenBLAS's
threads (`blas_for`)."""

from __future__ import annotations

import contextlib

NARROW = 2048  # blocks narrower than this run their BLAS/LAPACK calls on one thread (`blas_for`)


def blas_for(width: int) -> contextlib.AbstractContextManager:
    """One BLAS thread while working on blocks at most `width` wide, when that is below NARROW: OpenBLAS's
    threads cost more than they save on small matrices (measured on 2 busy cores: a 1792-wide float32 eigh
    took 5.6 s CPU / 28 s wall on the default threads and 0.5 s / 2.9 s on one; 211 products of 256-wide
    blocks 20x less), while a wide full block keeps every thread."""
    if width >= NARROW:
        return contextlib.nullcontext()
    import scipy.linalg  # noqa: F401  (loads scipy's own OpenBLAS first: threadpoolctl limits only loaded libraries)
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")

