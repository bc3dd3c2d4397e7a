"""BLAS threads per rank: cores on this node divided by the ranks on this node.

Oversubscribing cores (ranks x BLAS threads > cores) makes every rank slower
than running fewer threads, so each rank takes its share. Uses threadpoolctl,
which changes the thread count of an already-loaded OpenBLAS/MKL/BLIS.
"""

from __future__ import annotations

import os
import sys


def node_cores() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_threads(local_ranks: int) -> int:
    """Threads for one rank when ``local_ranks`` ranks share this node (never more than it may use)."""
    return min(node_cores(), max(1, (os.cpu_count() or 1) // max(1, local_ranks)))


def configure_blas_threads(requested: int, local_ranks: int, products: str = "numpy") -> int:
    """Set the threads per rank (``requested``, or automatic when 0); return what is in force.

    ``products`` names the library doing the matrix products (``model.products`` resolved):
    with ``numpy`` the BLAS gets the threads (and PyTorch, when imported, the same count); with
    ``torch`` PyTorch's pool gets them and NumPy's BLAS one thread, since it is then left with the
    small bias sums and two pools of spinning threads on the same cores slow each other down.
    """
    threads = requested if requested > 0 else auto_threads(local_ranks)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return threads
    threadpool_limits(limits=1 if products == "torch" else threads, user_api="blas")
    torch = sys.modules.get("torch")  # imported by dpbp.products only when PyTorch does the products
    if torch is not None:
        torch.set_num_threads(threads)
    return threads


def blas_info() -> list[dict]:
    """One entry per loaded BLAS: library, version, threads (for ``dpbp info``)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover
        return []
    return [
        {"library": i.get("internal_api"), "version": i.get("version"), "threads": i.get("num_threads"),
         "path": i.get("filepath")}
        for i in threadpool_info() if i.get("user_api") == "blas"
    ]
