"""Child processes that never outlive their stage, and pools that fail fast when one dies.

A stage that forks helpers (02's decoders and mosaic builders, 09's image measurers, 10's
thumbnail makers, the 03 that 09 and 11 start on their own mosaics) makes them here, so that:

* every child asks the kernel to kill it the moment its parent dies (Linux's
  ``PR_SET_PDEATHSIG``). A stage killed by SIGKILL, or by the out-of-memory killer, then leaves
  no orphan behind: none blocked forever on a pipe, none still holding the run's
  ``.stage.lock`` that it inherited (tools/runlock.py);
* a worker that dies fails its stage within seconds with one clear line (``WorkerDied``):
  ``concurrent.futures`` notices a dead worker and breaks the pool, where
  ``multiprocessing.Pool`` silently starts a replacement and waits forever for the lost task.

Workers are forked (they start with what the stage already imported and share its read-only
data without copies); the request to die with the parent is tied to the thread that forks them,
so pools are made and used by the stage's main thread.
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from typing import Callable, Iterator

from common.cli import StageError

_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


class WorkerDied(StageError):
    """A worker process of the stage died; the message says what to do."""


def die_with_parent(parent_pid: int) -> None:
    """In a child process: have the kernel SIGKILL it when its parent dies; exit at once when
    the parent ``parent_pid`` is already gone (it died between the fork and this call)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _start_worker(parent_pid: int, initializer: Callable | None, initargs: tuple) -> None:
    """First thing in a pool worker: tie it to its parent, then the caller's initializer."""
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def dead_worker_message(what: str) -> str:
    """The one line a stage stops with when one of its workers died."""
    return (f"{what}: a worker process died (killed from outside — most often by the system "
            f"when memory runs out); finished work is kept: run again, with WORKERS=1 (one "
            f"process) if memory is short")


@contextlib.contextmanager
def worker_pool(workers: int, what: str, initializer: Callable | None = None,
                initargs: tuple = ()) -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor`` of ``workers`` forked processes that die with this one, each
    started with ``initializer(*initargs)``. A worker that dies while the block runs becomes a
    ``WorkerDied`` naming ``what`` (e.g. "02 mosaics"); leaving the block ends the workers."""
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker,
        initargs=(os.getpid(), initializer, initargs))
    try:
        yield pool
    except concurrent.futures.process.BrokenProcessPool as err:
        raise WorkerDied(dead_worker_message(what)) from err
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
