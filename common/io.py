"""Atomic, deterministic file output and the small readers that go with it.

Every artefact of a run is written to a temporary file in its destination folder and moved into
place with ``os.replace``, so a crash never leaves a half-written file under the final name and
Make never mistakes a torn file for a finished one. Temporaries are named after their machine and
process (``.<name>.tmp-<host>-<pid>-…``): the next stage that runs removes those whose process is
gone (``sweep_temporaries``). A full disk becomes a ``DiskFull`` naming the folder and the space
needed. CSV cells that a spreadsheet would execute are neutralised on write and restored on read;
``plain_text`` strips the characters that would act on a terminal from untrusted text.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
import unicodedata
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from common.cli import FULL, StageError, file_system_problem

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamp so equal arrays give equal .npz bytes
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp makes 0600 files, outputs get the usual 0666 & ~umask
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"  # part of temporary names
_HASH_CHUNK = 1 << 20  # bytes read at a time by sha256_file: large files need little memory
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # cells a spreadsheet would run as a formula
_TEXT_MARK = "'"  # the spreadsheet convention for "this cell is text", put before such cells


class WriteFailed(StageError):
    """A write failed for a reason the user must fix (file-size limit, no permission, read-only
    disk); the message names the path and the fix (``common.cli.file_system_problem``)."""


class DiskFull(WriteFailed):
    """A write failed for lack of space; the message names the folder and the space needed."""

    def __init__(self, folder: str | os.PathLike, needed: int | None, partial: int = 0):
        """``needed``: bytes the failed write needed (None: unknown, ``partial`` written so far)."""
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
        need = (f"{_size(needed)} is needed" if needed is not None else
                f"more than the {_size(partial)} written so far is needed")
        super().__init__(f"disk full: {folder} has {_size(free)} free and {need}; free some "
                         f"space there (or point DATA=… at a larger disk) and run again: finished "
                         f"work is kept")


def _size(n_bytes: int) -> str:
    """A byte count for people (1.2 GB, 340 MB, 12 kB)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


@contextlib.contextmanager
def disk_guard(folder: str | os.PathLike, needed: int | None = None,
               partial: str | os.PathLike | None = None,
               target: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn a "no space left" OSError inside the block into a DiskFull for ``folder``, and the
    other errors a user must fix (file-size limit, permission, read-only disk) into a WriteFailed
    naming the file (``target``, the final name of a temporary being written; else the error's
    own file, ``partial`` or ``folder``) and the fix.

    ``needed`` is the size being written when known; else the size of ``partial`` (the file
    being written) is reported as a lower bound.
    """
    try:
        yield
    except OSError as err:
        if err.errno in FULL:
            written = os.path.getsize(partial) if partial and os.path.exists(partial) else 0
            raise DiskFull(folder, needed, written) from err
        message = file_system_problem(err, target or err.filename or partial or folder)
        if message is None:
            raise
        raise WriteFailed(message) from err


def _temp_prefix(name: str) -> str:
    """Prefix of a temporary beside ``name``: host and process id say whose it is, so that a
    later run can tell the leftovers of a killed process from the work of a running one."""
    return f".{name}.tmp-{_HOST}-{os.getpid()}-"


_TEMP_NAME = re.compile(rf"^\..*\.tmp-{re.escape(_HOST)}-(\d+)-")


def temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new temporary folder in ``parent`` named after ``name`` (removed by the caller, or by
    ``sweep_temporaries`` once its process is gone)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(name), dir=parent))


def _alive(pid: int) -> bool:
    """True when process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_temporaries(*folders: str | os.PathLike) -> int:
    """Remove, under ``folders`` (recursively), the temporaries of processes of this machine that
    no longer run (a killed stage's half-written files and scratch folders); return how many.

    Temporaries of running processes and of other machines (shards on a shared disk) are kept.
    """
    removed = 0
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for root, dirs, files in os.walk(folder):
            for name in list(dirs) + files:
                match = _TEMP_NAME.match(name)
                if not match or _alive(int(match.group(1))):
                    continue
                path = os.path.join(root, name)
                if name in dirs:
                    dirs.remove(name)
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None,
                needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    The temporary file lives in the same folder so that ``os.replace`` is a rename on one file
    system. On any exception the temporary file is removed and the old ``path`` (if any) is kept;
    a full disk becomes a DiskFull naming the folder and ``needed`` (the size, when known).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name),
                               suffix=suffix or path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with disk_guard(path.parent, needed, tmp_path, target=path):
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_UMASK)
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, needed=len(data)) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically (sorted keys keep bytes stable)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike):
    """Read a JSON file."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def plain_text(text: str) -> str:
    """``text`` with its control and format characters (terminal escape codes, bidirectional
    overrides, zero-width characters) turned into spaces and all whitespace squeezed to single
    spaces: safe to print on a terminal or to keep as a description."""
    return " ".join("".join(" " if unicodedata.category(ch) in ("Cc", "Cf") else ch
                            for ch in str(text)).split())


def safe_name(text: str, fallback: str) -> str:
    """``text`` (a class or layer name, possibly untrusted) as one file or folder name: runs of
    anything but ASCII letters, digits, dot and dash become ``_``, leading and trailing dots and
    underscores go (no hidden file, no ``..``); ``fallback`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("._") or fallback


def csv_cell(value):
    """``value`` as safe to open in a spreadsheet: text that would run as a formula (it starts
    with = + - @, a tab or a carriage return) gets the text mark ' in front, and so does text that
    starts with the mark itself, so that ``read_cell`` restores every text exactly. Numbers,
    including negative ones written as text ("-0.5"), are left alone: they are no formula."""
    if not isinstance(value, str) or not value.startswith((*_FORMULA_START, _TEXT_MARK)):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return _TEXT_MARK + value


def read_cell(text: str) -> str:
    """Undo ``csv_cell`` on one cell read back from a CSV."""
    return text[1:] if text.startswith(_TEXT_MARK) else text


def csv_row(row: Mapping) -> dict:
    """A row with every cell passed through ``csv_cell``."""
    return {key: csv_cell(value) for key, value in row.items()}


class CsvLines:
    """Dict rows → CSV lines ending in "\\n", cells neutralised by ``csv_cell``.

    Python's writer quotes a cell only for the characters of its line terminator, so rows are
    written with "\\r\\n" (cells holding either are quoted: a carriage return in a file name
    would otherwise split the row when read back) and that terminator is then shortened.
    """

    def __init__(self, fieldnames: Sequence[str]):
        """Columns of the rows; missing keys become empty cells, extra keys are ignored."""
        self.buf = io.StringIO(newline="")
        self.writer = csv.DictWriter(self.buf, fieldnames=list(fieldnames), extrasaction="ignore",
                                     lineterminator="\r\n")

    def _take(self) -> str:
        """What the writer wrote since the last call, with "\\n" line ends."""
        text = self.buf.getvalue()
        self.buf.seek(0)
        self.buf.truncate()
        return text[:-2] + "\n"

    def header(self) -> str:
        """The header line."""
        self.writer.writeheader()
        return self._take()

    def line(self, row: Mapping) -> str:
        """One row as a line."""
        self.writer.writerow(csv_row(row))
        return self._take()


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping], fieldnames: Sequence[str]) -> None:
    """Write dict rows to a CSV atomically; missing keys become empty cells; cells that a
    spreadsheet would execute are neutralised (``csv_cell``; ``read_csv`` restores them)."""
    lines = CsvLines(fieldnames)
    write_text(path, lines.header() + "".join(lines.line(row) for row in rows))


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a CSV written by ``write_csv`` into a list of dicts of strings, exactly as they were
    given to it (no type guessing: callers convert)."""
    with open(path, encoding="utf-8", newline="") as fh:
        return [{key: read_cell(value) if isinstance(value, str) else value
                 for key, value in row.items()} for row in csv.DictReader(fh)]


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Save arrays to an uncompressed .npz atomically, with byte-identical output for equal input.

    ``numpy.savez`` stamps each member with the current time; this writer fixes the timestamp and
    the member order so that a rerun on the same inputs reproduces the file exactly.
    """
    needed = sum(np.asarray(a).nbytes for a in arrays.values())
    with atomic_path(path, suffix=".npz", needed=needed) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in sorted(arrays):
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
                info.external_attr = 0o644 << 16
                with zf.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(arrays[name]), allow_pickle=False)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an .npz into a dict (pickles refused)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def sha256_file(path: str | os.PathLike, chunk: int = _HASH_CHUNK) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks so large files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a fully written folder onto ``final_dir``, replacing an older one.

    ``os.replace`` cannot overwrite a non-empty folder, so the old one is first moved aside and
    only deleted once the new one is in place.
    """
    final_dir = Path(final_dir)
    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(final_dir.name), dir=final_dir.parent))
    if final_dir.exists():
        os.replace(final_dir, old)  # onto the empty folder just made: a rename
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old)


class NpyRowWriter:
    """Write a 2-D float32 ``.npy`` file row block by row block, without holding it in memory.

    The header (shape known in advance) is written first; rows are appended in order. The result
    is an ordinary ``.npy`` that ``np.load(path, mmap_mode="r")`` maps.
    """

    def __init__(self, path: str | os.PathLike, n_rows: int, n_cols: int):
        """Create ``path`` with the header for an ``n_rows`` × ``n_cols`` float32 array.

        The file is opened only while a block is written, so that no descriptor stays open when
        the writer is abandoned (a full disk, an exception): its folder can then be removed.
        """
        self.path, self.n_rows, self.n_cols, self.written = Path(path), n_rows, n_cols, 0
        with self._guard(), open(self.path, "wb") as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                     "fortran_order": False, "shape": (n_rows, n_cols)})

    def _guard(self):
        """A full disk names the folder and the bytes still to write."""
        return disk_guard(self.path.parent, 4 * self.n_cols * (self.n_rows - self.written))

    def write(self, rows: np.ndarray) -> None:
        """Append a block of rows (r × n_cols)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_cols:
            raise ValueError(f"expected rows of {self.n_cols} columns, got shape {rows.shape}")
        with self._guard(), open(self.path, "ab") as fh:
            fh.write(rows.tobytes())
        self.written += rows.shape[0]

    def close(self) -> None:
        """Check that exactly the announced number of rows was written."""
        if self.written != self.n_rows:
            raise ValueError(f"{self.path}: wrote {self.written} rows, header says {self.n_rows}")
