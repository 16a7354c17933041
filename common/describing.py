"""Sentences for mosaics that are not a single neuron's: 03_describe.py run on a mosaic index.

11 describes baskets of neurons and their unions and differences this way: it writes an index in
02's format (``layer, channel, path, n_tiles, grid, tile_px, crop``), naming each mosaic by a
pseudo-layer and a number, and runs 03 itself on it with the run's describer arguments, so that
every sentence of a run comes from one describer. 09 does the same for sub-concepts, in the
background while it scores the neurons' own sentences (``Describing``, then ``result()``).

03 runs in a child process. Where the platform forks, the child is a fork of the calling stage,
which imports torch, torchvision and 03 first: the child then starts with them loaded instead of
spending seconds importing them again (on the demo, half of 03's time on 09's sub-concepts). It
runs 03's own ``main`` with the same arguments as the command line would, on one torch thread (a
forked process must not use an OpenMP pool its parent may have started), and its output goes to a
log file. Where forking is not possible (another platform, or CUDA already started in the caller:
CUDA does not survive a fork), the child is a new ``python 03_describe.py`` process.
"""
from __future__ import annotations

import functools
import importlib
import logging
import multiprocessing
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from common.artefacts import read_descriptions, read_mosaics
from common.cli import StageError
from common.processes import die_with_parent

log = logging.getLogger("neuron-atlas.describing")

ROOT = Path(__file__).resolve().parents[1]
TAIL_LINES = 20  # lines of a failed 03's log shown


def _can_fork() -> bool:
    """Whether 03 may run in a fork of this process (fork exists, CUDA not started here)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return False
    torch = sys.modules.get("torch")
    return not (torch is not None and torch.cuda.is_initialized())


def _describe_main():
    """03_describe.py's ``main``, imported as a module (its file name starts with a digit)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("03_describe").main


def _forked_child(argv: list[str], log_path: str, parent_pid: int) -> None:
    """Body of the forked child: output to ``log_path``, one torch thread, 03's ``main``."""
    die_with_parent(parent_pid)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # New streams on the redirected descriptors: the inherited ones may write elsewhere (a test
    # runner's capture, for one).
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    import torch
    torch.set_num_threads(1)
    _describe_main()(argv)


class Describing:
    """03_describe.py at work on a mosaic index (see the module docstring): ``result()`` waits for
    its sentences, ``stop()`` ends it early."""

    def __init__(self, index: Path, out: Path, describe_args: str, levels: dict[str, int],
                 extra: Sequence[str] = ()):
        """Start 03 on the mosaics of ``index``, writing ``out`` (its log beside it) with
        ``describe_args`` (the run's describer arguments), ``levels`` (pseudo-layer → the level
        of the real layer it stands for) and ``extra`` arguments."""
        self.index, self.out = index, out
        self.log_path = out.parent / "03_describe.log"
        argv = ["--mosaics", str(index), "--out", str(out), *extra, *shlex.split(describe_args)]
        if levels:
            argv += ["--levels", ",".join(f"{name}={level}" for name, level in levels.items())]
        log.info("describing %d mosaics of %s with 03_describe.py", len(read_mosaics(index)),
                 index)
        out.parent.mkdir(parents=True, exist_ok=True)
        self._process = self._popen = None
        if _can_fork():
            import torch  # noqa: F401  (loaded once here: the child inherits them)
            import torchvision  # noqa: F401
            _describe_main()
            self._process = multiprocessing.get_context("fork").Process(
                target=_forked_child, args=(argv, str(self.log_path), os.getpid()), daemon=True)
            self._process.start()
            return
        # One thread for its numeric libraries unless the user set another number.
        env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               **os.environ}
        # The log goes to a file, not a pipe: an unread pipe would block 03 once full.
        with open(self.log_path, "w") as stream:
            self._popen = subprocess.Popen([sys.executable, str(ROOT / "03_describe.py"), *argv],
                                           cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT,
                                           env=env, preexec_fn=functools.partial(
                                               die_with_parent, os.getpid()))

    def _wait(self) -> int:
        """Wait for the child; its exit status."""
        if self._process is not None:
            self._process.join()
            return self._process.exitcode
        return self._popen.wait()

    def result(self) -> dict[tuple[str, int], str]:
        """Wait for 03 → (pseudo-layer, channel) → sentence ("" where 03 could not describe)."""
        if self._wait() != 0:
            lines = [line for line in (self.log_path.read_text(errors="replace").splitlines()
                                       if self.log_path.exists() else []) if line.strip()]
            for line in lines[-TAIL_LINES:]:
                log.error("03: %s", line)
            raise StageError(f"03_describe.py failed on the mosaics of {self.index}: "
                             f"{lines[-1] if lines else 'no output'} (the end of its log "
                             f"{self.log_path} is above)")
        return {d.key: d.description if d.status == "ok" else ""
                for d in read_descriptions(self.out)}

    def stop(self) -> None:
        """End 03 if it is still running (the caller failed first): no process is left behind."""
        child = self._process or self._popen
        if (child.is_alive() if self._process is not None else child.poll() is None):
            child.kill()
        self._wait()


def describe_index(index: Path, out: Path, describe_args: str,
                   levels: dict[str, int]) -> dict[tuple[str, int], str]:
    """Run 03_describe.py on the mosaics of ``index`` and wait: (pseudo-layer, channel) →
    sentence ("" where 03 failed)."""
    return Describing(index, out, describe_args, levels).result()
