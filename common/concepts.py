"""A user's concept list: one phrase per line, read the same way by every stage that takes one
(09's refinement adds them as candidate sentences; `make label` labels neurons with them).

Blank lines and lines starting with ``#`` are skipped; a phrase listed twice (case and spacing
aside) is kept once, in its first place.
"""
from __future__ import annotations

import os
from pathlib import Path

from common.cli import StageError


def read_concepts(path: str | os.PathLike) -> list[str]:
    """The phrases of the concept file ``path``, in file order, without repeats."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StageError(f"concept file {path} does not exist: give CONCEPTS=<file> with one "
                         "phrase per line, or leave CONCEPTS empty") from None
    except UnicodeDecodeError:
        raise StageError(f"concept file {path} is not UTF-8 text: save it as plain UTF-8 text "
                         "with one phrase per line") from None
    phrases, seen = [], set()
    for line in text.splitlines():
        phrase = " ".join(line.split())
        key = phrase.casefold()
        if not phrase or phrase.startswith("#") or key in seen:
            continue
        seen.add(key)
        phrases.append(phrase)
    if not phrases:
        raise StageError(f"concept file {path} lists no phrase: write one concept per line "
                         "(lines starting with # are comments)")
    return phrases
