"""How many threads a stage's numeric libraries use.

On a shared 2-core machine, BLAS and torch spread small operations over several threads that then
wait for each other: when other processes hold the cores, those waits cost far more than the work
(09's per-neuron clustering ran 5–7× slower with OpenBLAS's two threads than with one). A stage
that parallelises with worker processes instead runs its own numeric work on one thread.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager


@contextmanager
def one_thread():
    """Run the block with one BLAS/OpenMP thread and one torch thread (restored afterwards;
    processes forked inside the block inherit the limits)."""
    import torch
    from threadpoolctl import threadpool_limits
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def single_threaded(function):
    """Decorator: ``function`` runs inside ``one_thread()``."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        """Call ``function`` with the thread limits of ``one_thread``."""
        with one_thread():
            return function(*args, **kwargs)
    return wrapper
