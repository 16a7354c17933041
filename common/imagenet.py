"""The 1000 ImageNet-1k classes: names in torchvision's order and their WordNet synset ids.

Both come from ``imagenet_classes.tsv`` beside this file (columns ``index, synset, name``), so
that folders in the usual ImageNet layout (``train/n01440764/…``) map onto a classifier's output
indices offline and without extra packages. The names are torchvision's (its weight metadata,
where the two classes called "crane" and "maillot" are told apart); the synset ids are the
standard sorted ILSVRC-2012 list, whose order the classifier heads follow (index 0 is n01440764
"tench", index 999 is n15075141 "toilet tissue").
"""
from __future__ import annotations

import functools
from pathlib import Path

_TABLE = Path(__file__).with_name("imagenet_classes.tsv")
N_CLASSES = 1000  # ImageNet-1k


@functools.lru_cache(maxsize=1)
def _read_table() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Read the table once: (synsets, names), checked for size and order."""
    lines = _TABLE.read_text(encoding="utf-8").splitlines()
    rows = [line.split("\t") for line in lines[1:] if line]
    if len(rows) != N_CLASSES or any(int(r[0]) != i for i, r in enumerate(rows)):
        raise RuntimeError(f"{_TABLE} is damaged: expected rows 0…{N_CLASSES - 1} in order")
    return tuple(r[1] for r in rows), tuple(r[2] for r in rows)


def class_names() -> list[str]:
    """The 1000 class names, index = the classifier's output index (torchvision order)."""
    return list(_read_table()[1])


def synsets() -> list[str]:
    """The 1000 WordNet synset ids (``n01440764`` …) in the same order as :func:`class_names`."""
    return list(_read_table()[0])
