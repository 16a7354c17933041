"""Command-line plumbing shared by the stage scripts: the opening of every ``main()``, logging to
stderr, the allocator setting, ``--shard i/N`` and the one-line exit on a StageError.

Every stage opens the same way::

    def build_parser():
        p = stage_parser(__doc__.split("\n")[0])       # --verbose is already there
        p.add_argument(...)
        return p

    @exit_on_stage_error
    def main(argv=None):
        args = start_stage(build_parser(), argv, keep_memory=True)   # keep_memory: torch-heavy

Importing this module sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already says
otherwise (the Makefile exports the same default). The OpenMP runtime that torch ships reads the
variable once, when ``import torch`` loads it, so a default set later, even first thing in
``main()``, is silently ignored. Every stage imports this module, directly or through another
common module, before anything imports torch (tests/test_cli.py checks it), so the default holds
whether a stage is run by make or by hand. Idle threads then sleep instead of spinning: on a
busy 2-core machine spinning threads made the torch stages 10–20× slower.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import errno
import functools
import gc
import logging
import os
import pathlib
import shutil
import sys
import types
import typing
import unicodedata

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def stage_parser(description: str) -> argparse.ArgumentParser:
    """A stage's argument parser: ``description`` on top, defaults shown in ``--help``, and the
    ``-v/--verbose`` flag that :func:`start_stage` reads."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def start_stage(parser: argparse.ArgumentParser, argv=None, *,
                keep_memory: bool = False) -> argparse.Namespace:
    """Opening of a stage's ``main()``: parse ``argv`` (None: the command line), log to stderr
    (DEBUG with ``--verbose``) and, with ``keep_memory`` (stages that push large tensors through
    torch batch after batch), keep freed memory for reuse. Returns the parsed flags."""
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if keep_memory:
        keep_freed_memory()
    return args


def setup_logging(verbose: bool = False) -> None:
    """Send log records to stderr (data goes to files), INFO by default, DEBUG with ``verbose``;
    control characters in what a record shows of user text come out escaped (``ShowControls``)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(ShowControls())


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escaped(text) -> str:
    """``text`` with every control or format character (terminal escape codes, carriage returns,
    newlines, bidirectional overrides, zero-width characters) shown as an escape — ``\\x1b``,
    ``\\r``, ``\\n``, ``\\u202e`` — and everything else as it is. For user text (file, folder,
    label, class and concept names) shown in a log, a terminal or a report: it can neither act on
    the terminal or the page nor fake a line of its own."""
    text = str(text)
    if text.isprintable():
        return text

    def show(ch: str) -> str:
        """One character, escaped when it is a control or format character."""
        if unicodedata.category(ch) not in ("Cc", "Cf"):
            return ch
        code = ord(ch)
        return _NAMED_ESCAPES.get(ch) or (f"\\x{code:02x}" if code < 0x100 else
                                          f"\\u{code:04x}" if code < 0x10000 else
                                          f"\\U{code:08x}")
    return "".join(map(show, text))


class ShowControls(logging.Filter):
    """Escape the control characters of a log record's arguments (``escaped``): names, paths and
    the messages of exceptions (which quote user text). The record's own format string is the
    code's and is left alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Escape the arguments in place; keep every record."""
        if isinstance(record.args, tuple):
            record.args = tuple(escaped(a) if isinstance(a, (str, os.PathLike, BaseException))
                                else a for a in record.args)
        return True


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """Ask glibc to reuse freed memory instead of returning it to the system at once.

    By default glibc serves every block over a few MB with a fresh ``mmap`` and unmaps it when
    freed, so each batch's large activation tensors cost page faults on every layer: on this
    2-core machine 01_extract spent more time in the kernel than in convolutions (26 s vs 9 s for
    256 images). Keeping the heap makes the process's peak memory its steady memory. No-op where
    the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):  # not glibc (e.g. musl): keep the default allocator
        return


def setting(default, help: str, *, make: str | None = None, choices=None):
    """A field of a stage's frozen ``Settings`` dataclass: its default (written here once), the
    help of its flag, the Makefile variable that sets it (``make``; tests/test_make.py checks that
    the Makefile's default equals this one) and its allowed values."""
    metadata = {"help": help}
    if make:
        metadata["make"] = make
    if choices:
        metadata["choices"] = list(choices)
    return dataclasses.field(default=default, metadata=metadata)


def add_settings(parser: argparse.ArgumentParser, settings: type) -> None:
    """Add one flag per field of the frozen dataclass ``settings`` to ``parser``: ``--field-name``
    with the field's default (written once, in the dataclass), its help and choices from the
    field's metadata (``help``, ``choices``); a bool field becomes a switch. Read the flags back
    with :func:`settings_from`."""
    hints = typing.get_type_hints(settings)
    for field in dataclasses.fields(settings):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        help_text = field.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=field.default, help=help_text)
            continue
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # "int | None"
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        parser.add_argument(flag, type=kind, default=field.default, help=help_text,
                            choices=field.metadata.get("choices"))


def add_run(parser: argparse.ArgumentParser, reads: str, writes: str) -> None:
    """``--run DIR``: the run folder whose contract files the stage reads and writes
    (common.artefacts.Run); ``reads`` and ``writes`` name them in the help."""
    parser.add_argument("--run", required=True, type=pathlib.Path, metavar="DIR",
                        help=f"run folder (make: data/<RUN>/); reads {reads}; writes {writes}")


def settings_from(settings: type, args: argparse.Namespace):
    """The ``settings`` dataclass filled from parsed flags (those :func:`add_settings` added)."""
    return settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(settings)})


def comma_list(text: str) -> list[str]:
    """The items of a comma-separated setting (``--layers a, b``), stripped, empty ones dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"i/N"`` (0 ≤ i < N) into ``(i, N)``; argparse type for ``--shard``."""
    try:
        index_s, count_s = text.split("/")
        index, count = int(index_s), int(count_s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects i/N such as 0/4, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text}: need N ≥ 1 and 0 ≤ i < N")
    return index, count


def shard_slice(n_items: int, shard: tuple[int, int]) -> range:
    """Contiguous block of item indices that shard ``(i, N)`` owns out of ``n_items``."""
    index, count = shard
    start = n_items * index // count
    stop = n_items * (index + 1) // count
    return range(start, stop)


@dataclasses.dataclass(frozen=True)
class ModelAgain:
    """Settings of a stage that runs 01's model again (08, 11, 13), inherited by its ``Settings``:
    the model, as the user names it again — ``common.models.reload_model`` checks them against
    01's meta, for a meta never chooses code to run."""

    model: str | None = setting(None, "the model 01 ran, named again (needed when it is a file; "
                                "make passes MODEL)")
    weights: str | None = setting(None, "01's weights file, named again (make passes WEIGHTS)")
    unsafe_pickle: bool = setting(False, "allow loading a whole pickled checkpoint (trusted "
                                  "files only)")

    def model_again(self) -> dict:
        """These settings as ``reload_model``'s keyword arguments."""
        return {"model": self.model, "weights": self.weights, "unsafe_pickle": self.unsafe_pickle}


class StageError(RuntimeError):
    """A run cannot go on; the message says what is wrong and how to fix it."""


FULL = (errno.ENOSPC, errno.EDQUOT)  # "no space left" and "quota exceeded"
# Errors of the file system that the user, not the code, must fix.
_FILE_SYSTEM = FULL + (errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS)
_KEPT = "then run again: finished work is kept"


def file_system_problem(err: OSError, path: str | os.PathLike | None = None) -> str | None:
    """One line saying what ``err`` (raised while using ``path``, else its own file name) means
    and how to fix it, when it is a file-system error the user must fix (a full disk, a file-size
    limit, no permission, a read-only disk); None for any other error."""
    if err.errno not in _FILE_SYSTEM:
        return None
    path = os.path.abspath(path or err.filename or os.getcwd())
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if err.errno in FULL:
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
        return (f"disk full while writing {path}: {folder} has {free / 1e6:.1f} MB free; free "
                f"some space there (or point DATA=… at a larger disk), {_KEPT}")
    if err.errno == errno.EFBIG:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        shown = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit / 1e6:.1f} MB"
        return (f"cannot write {path}: the file would be larger than allowed (the file-size "
                f"limit of this shell, `ulimit -f`, is {shown}; else the file system's own "
                f"limit); raise the limit (`ulimit -f unlimited`) or point DATA=… at another "
                f"file system, {_KEPT}")
    if err.errno == errno.EROFS:
        return (f"cannot write {path}: {folder} is on a read-only file system; point DATA=… at "
                f"a writable disk, {_KEPT}")
    return (f"cannot use {path}: permission denied; make it (and {folder}) readable and "
            f"writable for you, or point DATA=… at a folder of yours, {_KEPT}")


def exit_on_stage_error(func):
    """Decorator for ``main``: turn a StageError, or a file-system error that no writer caught
    (full disk, file-size limit, no permission, read-only disk), into a one-line message and exit
    status 2; a stage run as a program exits quickly (see below)."""
    @functools.wraps(func)
    def wrapper(argv=None):
        log = logging.getLogger("neuron-atlas")
        try:
            result = func(argv)
            if func.__module__ == "__main__":
                # The stage is the program and its work is done. Python's last garbage collection
                # at exit walks every object alive, and torch, torchvision and transformers leave
                # millions: after 09 that took 1.5 s. Frozen objects are left out of it (0.2 s);
                # files are closed and atexit handlers run as before. Tests that call main() in
                # their own process do not freeze anything.
                gc.freeze()
            return result
        except StageError as err:
            log.error("%s", err)
            sys.exit(2)
        except OSError as err:
            message = file_system_problem(err)
            if message is None:
                raise
            log.error("%s", message)
            sys.exit(2)
    return wrapper


def parse_floats(text: str) -> tuple[float, ...]:
    """Parse ``"0.5"`` or ``"0.485,0.456,0.406"`` into a tuple; argparse type for --mean/--std."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 1 or 3 comma-separated numbers, got {text!r}"
                                         ) from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected 1 or 3 comma-separated numbers, got {text!r}")
    return values
