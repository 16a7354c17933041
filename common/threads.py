"""How many threads a stage's numeric libraries use.

On a shared 2-core machine, BLAS and torch spread small operations over several threads that then
wait for each other: when other processes hold the cores, those waits cost far more than the work
(09's per-neuron clustering ran 5–7× slower with OpenBLAS's two threads than with one, 05's
k-means fits 8–16× slower, and embedding 1000 class names took 13 s with torch's two threads
against 2.5 s with one). A stage that parallelises with worker processes, or whose numeric work
is many small operations (05's k search), runs that work on one thread. Torch's thread count is
set only around the work that needs it (``one_torch_thread``), not while worker processes are
forked.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager


@contextmanager
def one_torch_thread():
    """Run the block with one torch thread (restored afterwards). Fork no process inside it."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded(function):
    """Decorator: ``function`` runs with one BLAS/OpenMP thread (threadpoolctl; restored
    afterwards, and inherited by the processes it forks)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        """Call ``function`` under a one-thread limit of BLAS and OpenMP."""
        from threadpoolctl import threadpool_limits
        with threadpool_limits(1):
            return function(*args, **kwargs)
    return wrapper
