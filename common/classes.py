"""Class names of the analysed model: reading a class file, and comparing names the lenient way.

A class file (``--classes`` / Make ``CLASSES``) names the model's outputs in index order, in one of
two forms:

* **text** — one name per line, line 1 for output 0 (blank lines at the end are ignored);
* **CSV** (``.csv`` or ``.tsv``) — rows ``index,name``, in any order, with or without a header
  line; the indices must be exactly 0 … N−1.

Names are compared with :func:`name_key`: letter case, ``_``, ``-`` and runs of spaces do not
matter, so the folder ``Ankle_boot`` and the class ``ankle boot`` are the same class.
"""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Sequence

from common.cli import StageError, escaped


def name_key(text: str) -> str:
    """Comparison key for class names: case-folded, ``_`` and ``-`` read as spaces, spaces collapsed."""
    return " ".join(text.replace("_", " ").replace("-", " ").split()).casefold()


def read_class_file(path: str | Path) -> list[str]:
    """The class names in a text or CSV class file (see the module docstring), index order."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"class file {path} does not exist; give CLASSES=names.txt (one class "
                         f"name per line, in output order) or a CSV of index,name")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise StageError(f"cannot read the class file {path}: {err}; save it as UTF-8 text") from None
    if path.suffix.lower() in (".csv", ".tsv"):
        names = _read_index_csv(path, text, "\t" if path.suffix.lower() == ".tsv" else ",")
    else:
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
        if blank:
            raise StageError(f"class file {path} has blank lines ({blank[:5]}) among the names; "
                             f"line N must name output N−1, so remove them or name those classes")
        names = [line.strip() for line in lines]
    if not names:
        raise StageError(f"class file {path} names no class")
    shared = [name for name, n in Counter(name_key(x) for x in names).items() if n > 1]
    if shared:
        raise StageError(f"class file {path} names several classes alike ({', '.join(shared[:5])}; "
                         f"case, '_', '-' and spaces are not told apart): make every name distinct")
    return [escaped(name) for name in names]  # shown everywhere: no control character acts


def _read_index_csv(path: Path, text: str, delimiter: str) -> list[str]:
    """Names from ``index,name`` rows; a first row whose index is not a number is a header."""
    rows = [r for r in csv.reader(text.splitlines(), delimiter=delimiter) if any(c.strip() for c in r)]
    if rows and not rows[0][0].strip().isdecimal():
        rows = rows[1:]
    by_index: dict[int, str] = {}
    for line_no, row in enumerate(rows, start=1):
        if len(row) < 2 or not row[0].strip().isdecimal() or not row[1].strip():
            raise StageError(f"class file {path}: row {line_no} {row!r} is not 'index,name'")
        index = int(row[0])
        if index in by_index:
            raise StageError(f"class file {path}: index {index} appears twice")
        by_index[index] = row[1].strip()
    missing = sorted(set(range(len(by_index))) - set(by_index))
    if missing:
        raise StageError(f"class file {path}: indices must run from 0 to {len(by_index) - 1}; "
                         f"missing {missing[:10]}")
    return [by_index[i] for i in range(len(by_index))]


def classes_of_model(model) -> list[str] | None:
    """Class names a model carries itself (a ``classes`` or ``class_names`` attribute: a list of
    names, or a dict index → name), else None."""
    for attr in ("classes", "class_names"):
        value = getattr(model, attr, None)
        if isinstance(value, dict) and value and all(isinstance(k, int) for k in value):
            if sorted(value) == list(range(len(value))):
                return [str(value[i]) for i in range(len(value))]
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return list(value)
    return None


def folder_classes(labels: Sequence[str], n_outputs: int | None) -> list[str] | None:
    """torchvision ``ImageFolder``'s convention: the sorted class folder names are the classes,
    when there are exactly as many as the model has outputs (and they are not plain indices)."""
    present = sorted({lab for lab in labels if lab})
    if n_outputs is None or len(present) != n_outputs or all(lab.isdecimal() for lab in present):
        return None
    return present
