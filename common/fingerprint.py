"""Fingerprint of what stage 01 reads, so that Make re-runs 01 whenever its inputs change.

Make compares timestamps, and a folder's timestamp changes only when an entry is added to or
removed from that folder itself, not below it, nor when a file is replaced. So the Makefile runs
this module when it starts and stores the printed digest in ``data/<RUN>/.args/01-inputs`` only
when it differs, which makes 01 (and what follows) out of date.

What goes in:

* an image folder: every file below it (hidden ones aside, as the listing skips them) by relative
  path, size and modification time in nanoseconds — one ``stat`` per file, no reading, so 50,000
  images cost well under a second; adding, removing, renaming or rewriting any file changes it;
* a CSV list: the bytes of the CSV, and the path, size and modification time of each file it names;
* the model's own files, by content: a ``file.py`` factory, a checkpoint, ``WEIGHTS``, ``CLASSES``
  (a ``touch`` alone re-runs nothing).

Standard library only: it runs before ``.venv`` exists. Prints the digest, or an error line and
exit status 2. Example:

  python3 -m common.fingerprint --images=data/photos --model=net.py:build --weights=net.pt
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import os
import sys
from pathlib import Path

from common.cli import escaped

CHUNK = 1 << 20  # bytes read at a time when hashing a file's content


class InputError(Exception):
    """An input named on the command line does not exist or cannot be read."""


def content_digest(path: Path) -> str:
    """blake2b of a file's bytes."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    return digest.hexdigest()


def stat_line(path: str) -> str:
    """``size mtime_ns`` of a file, or ``missing`` (01 records such a file as skipped)."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size} {st.st_mtime_ns}"


def folder_lines(folder: Path):
    """One line per file below ``folder``: relative path, size and mtime_ns, in a fixed order."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link pointing back up the tree: walked once, as the listing does
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = os.path.relpath(root, folder)
        for name in sorted(files):
            if not name.startswith("."):
                yield f"{os.path.join(rel_root, name)!r} {stat_line(os.path.join(root, name))}"


def csv_lines(csv_path: Path):
    """The CSV's content digest, then path, size and mtime_ns of each file it names."""
    yield content_digest(csv_path)
    delimiter = "\t" if csv_path.suffix.lower() == ".tsv" else ","
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            column = next((c for c in reader.fieldnames or [] if (c or "").strip().lower() == "path"),
                          None)
            for row in reader if column else []:
                rel = (row.get(column) or "").strip()
                path = rel if os.path.isabs(rel) else os.path.join(csv_path.parent, rel)
                yield f"{rel!r} {stat_line(path)}"
    except (UnicodeDecodeError, csv.Error):
        return  # 01 reports an unreadable list; its bytes are already in the digest


def model_files(model: str) -> list[Path]:
    """The files a model name points at: the ``.py`` of ``file.py:function``, or a checkpoint."""
    if ":" in model and model.rpartition(":")[0].endswith(".py"):
        return [Path(model.rpartition(":")[0])]
    if Path(model).suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return [Path(model)]
    return []  # a name (efficientnet_lite0, resnet50): its weights come with a library version


def fingerprint(images: str | None, model: str, weights: str | None, classes: str | None) -> str:
    """The digest of everything listed in the module docstring."""
    digest = hashlib.blake2b(digest_size=16)

    def add(line: str) -> None:
        """Feed one line to the digest."""
        digest.update(line.encode("utf-8", "surrogateescape") + b"\n")

    if images is not None:
        source = Path(images)
        if source.is_dir():
            add("folder")
            for line in folder_lines(source):
                add(line)
        elif source.is_file():
            add("list")
            for line in csv_lines(source):
                add(line)
        else:
            raise InputError(f"IMAGES={images} does not exist: give an image folder (class "
                             f"sub-folders = labels) or a CSV list with a 'path' column")
    for what, path in [("MODEL", p) for p in model_files(model)] + \
            [(what, Path(p)) for what, p in (("WEIGHTS", weights), ("CLASSES", classes)) if p]:
        if not path.is_file():
            raise InputError(f"{what} file {path} does not exist")
        add(f"{what} {content_digest(path)}")
    return digest.hexdigest()


def main(argv=None) -> None:
    """Print the fingerprint of the inputs given as flags, or an error line and exit status 2."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", default=None, help="image folder or CSV (omit: not fingerprinted)")
    p.add_argument("--model", default="", help="MODEL as given to 01")
    p.add_argument("--weights", default=None, help="WEIGHTS file")
    p.add_argument("--classes", default=None, help="CLASSES file")
    args = p.parse_args(argv)
    try:
        print(fingerprint(args.images, args.model, args.weights, args.classes))
    except InputError as err:
        print(f"error: {escaped(err)}")
        sys.exit(2)


if __name__ == "__main__":
    main()
