"""One writer per run folder: the locks that keep two `make` runs (or a stage left running by a
killed `make`) from writing into the same ``data/<RUN>/`` at once.

Two lock files in the run folder, both ``flock`` locks that the kernel releases when their holder
dies, even by SIGKILL:
  .make.lock   held for the life of a `make` process. The Makefile takes it while reading itself,
               before it stores anything (``python3 -m tools.runlock make DIR PID``): a helper
               process keeps the lock until that `make` exits, and a second `make` stops at once
               with a message.
  .stage.lock  held by each stage process: the Makefile starts stages through
               ``python -m tools.runlock stage DIR -- command…``, which takes the lock and
               becomes the command. A stage that outlives a killed `make` still holds it, so the
               next `make` waits for nothing and writes nothing: it stops and says so. Worker
               processes a stage forks share its lock; they die with it (common/processes.py),
               and should one live on, the message names the live holders, not the dead stage.

Standard library only (with common.cli, which is too): it runs before the virtual environment
exists.
"""
from __future__ import annotations

import fcntl
import os
import select
import sys
import time
from pathlib import Path

from common.cli import escaped

MAKE_LOCK = ".make.lock"
STAGE_LOCK = ".stage.lock"
DEAD_HOLDER_WAIT_S = 5.0  # a lock whose holder just exited is freed within this time


class Busy(Exception):
    """The lock is held by a live process; the message says by whom."""


def _try_lock(path: Path) -> int:
    """Open ``path`` and take its lock without waiting → the file descriptor; Busy if held.

    A holder that is already gone (its helper releases the lock a moment later) is waited for.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + DEAD_HOLDER_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            stamp = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            pid = int(stamp.split()[0]) if stamp[:1].isdigit() else 0
            if (pid and _alive(pid)) or time.monotonic() > deadline:
                os.close(fd)
                # The stamp names the process that took the lock. Processes it forked share the
                # lock and may keep it after it died: then the live holders are named instead.
                live = [] if pid and _alive(pid) else _holders(path)
                named = "; ".join(f"{p} {command}" for p, command in live)
                raise Busy(escaped(named or stamp or "unknown process")) from None
            time.sleep(0.05)


def _holders(path: Path) -> list[tuple[int, str]]:
    """The live processes, other than this one, with ``path`` open (the lock is shared by all
    of them: a stage's forked workers inherit it), as (pid, command line); empty where /proc
    cannot tell (another platform, another user's processes)."""
    try:
        target = os.stat(path)
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    found = []
    for pid in sorted(pids):
        if pid == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            for fd in fds:
                info = os.stat(f"/proc/{pid}/fd/{fd}")
                if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        words = fh.read().split(b"\0")
                    command = " ".join(w.decode("utf-8", "replace") for w in words if w)
                    found.append((pid, command[:200]))
                    break
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return found


def _alive(pid: int) -> bool:
    """True when process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stamp(fd: int, text: str) -> None:
    """Write who holds the lock into the lock file (read by the next one that finds it busy)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{text}\n".encode(), 0)


def _wait_for_exit(pid: int) -> None:
    """Return when process ``pid`` has exited (a pidfd where Linux has one, else polling)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        while _alive(pid):
            time.sleep(0.1)
        return
    select.select([pidfd], [], [])
    os.close(pidfd)


def hold_for_make(folder: Path, make_pid: int) -> str:
    """Take the run folder's locks for the `make` process ``make_pid``.

    Returns "" when the lock is taken (a detached helper holds it until that `make` exits), or
    the message to stop with.
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = _try_lock(folder / MAKE_LOCK)
    except Busy as held:
        return (f"another make ({held}) is already running on {folder}; wait for it to finish "
                f"(or stop it), then run make again")
    try:
        os.close(_try_lock(folder / STAGE_LOCK))
    except Busy as held:
        os.close(fd)
        return (f"a stage started by an earlier, interrupted make is still writing into "
                f"{folder} ({held}); wait for it to end (or stop it), then run make again")
    _stamp(fd, f"{make_pid} make, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    if os.fork():
        os.close(fd)  # the helper's copy keeps the lock
        return ""
    os.setsid()  # not stopped by a Ctrl-C meant for make: it ends with make anyway
    devnull = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(devnull, std)  # make's $(shell) waits until every writer of its pipe is gone
    _wait_for_exit(make_pid)
    os._exit(0)


def exec_stage(folder: Path, command: list[str]) -> None:
    """Take the stage lock of ``folder`` and replace this process with ``command`` (which keeps
    the lock until it exits); exit 2 with a message when another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = _try_lock(folder / STAGE_LOCK)
    except Busy as held:
        sys.exit(f"another process ({held}) is writing into {folder}; wait for it to end, then "
                 f"run again")
    _stamp(fd, f"{os.getpid()} {' '.join(command)[:200]}")
    os.set_inheritable(fd, True)
    os.execvp(command[0], command)


def main(argv: list[str] | None = None) -> None:
    """``make DIR PID``: print "" or why not; ``stage DIR -- command…``: run command locked."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "make":
        print(escaped(hold_for_make(Path(argv[1]), int(argv[2]))), flush=True)
    elif len(argv) >= 4 and argv[0] == "stage" and argv[2] == "--":
        exec_stage(Path(argv[1]), argv[3:])
    else:
        sys.exit("usage: python -m tools.runlock make DIR MAKE_PID | stage DIR -- COMMAND…")


if __name__ == "__main__":
    main()
