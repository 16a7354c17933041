"""Atomic, deterministic file output and the small readers that go with it.

Every artefact of a run is written to a temporary file in its destination folder and moved into
place with ``os.replace``, so a crash never leaves a half-written file under the final name and
Make never mistakes a torn file for a finished one.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamp so equal arrays give equal .npz bytes
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp makes 0600 files, outputs get the usual 0666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    The temporary file lives in the same folder so that ``os.replace`` is a rename on one file
    system. On any exception the temporary file is removed and the old ``path`` (if any) is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
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


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping], fieldnames: Sequence[str]) -> None:
    """Write dict rows to a CSV atomically; missing keys become empty cells."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_text(path, buf.getvalue())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a CSV into a list of dicts of strings (no type guessing: callers convert)."""
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Save arrays to an uncompressed .npz atomically, with byte-identical output for equal input.

    ``numpy.savez`` stamps each member with the current time; this writer fixes the timestamp and
    the member order so that a rerun on the same inputs reproduces the file exactly.
    """
    with atomic_path(path, suffix=".npz") as tmp:
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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
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
    import shutil
    final_dir = Path(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


class NpyRowWriter:
    """Fill a 2-D float32 ``.npy`` file (``np.lib.format.open_memmap``) block of rows by block of
    rows, in order, without holding it in memory; ``close`` checks that every row was written."""

    def __init__(self, path: str | os.PathLike, n_rows: int, n_cols: int):
        """Create ``path`` as an ``n_rows`` × ``n_cols`` float32 array mapped into memory."""
        self.path, self.written = Path(path), 0
        self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32,
                                               shape=(n_rows, n_cols))

    def write(self, rows: np.ndarray) -> None:
        """Write the next block of rows (r × n_cols)."""
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.array.shape[1]:
            raise ValueError(f"expected rows of {self.array.shape[1]} columns, got shape "
                             f"{rows.shape}")
        self.array[self.written:self.written + len(rows)] = rows
        self.written += len(rows)

    def close(self) -> None:
        """Flush the file to disk, checking that exactly the announced number of rows was written."""
        n_rows = self.array.shape[0]
        self.array.flush()
        del self.array  # unmaps the file
        if self.written != n_rows:
            raise ValueError(f"{self.path}: wrote {self.written} rows, header says {n_rows}")
