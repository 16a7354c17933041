"""Concept lists and how neurons align with concepts (SemanticLens, Eq. 4).

A user's concept list: one phrase per line, read the same way by every stage that takes one
(09's refinement adds them as candidate sentences; 15_label labels neurons with them; SHIPPED is
the project's own list of a few hundred common visual words). Blank lines and lines starting with
``#`` are skipped; a phrase listed twice (case and spacing aside) is kept once, in its first place.

A neuron's alignment with a concept is cos(neuron, concept) − cos(neuron, empty text): the
similarity to the empty text is what any text gains from the template alone, so it is taken off
(13's audit and 15's labels both use ``best_alignment``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cli import StageError

SHIPPED = Path(__file__).with_name("concepts.txt")  # the shipped list (`make label`, no CONCEPTS)


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


@dataclass(frozen=True)
class Alignment:
    """Each neuron's best concept of a set: ``index`` into the set (−1 for an empty set),
    ``cosine`` with it, ``baseline`` (cosine with the empty text) and ``score`` = cosine −
    baseline (−inf for an empty set). One entry per neuron."""
    score: np.ndarray
    index: np.ndarray
    cosine: np.ndarray
    baseline: np.ndarray


def alignments(neurons: np.ndarray, concepts: np.ndarray, empty: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Neurons × concepts matrix of cos(neuron, concept) − cos(neuron, empty text), and each
    neuron's cosine with the empty text (the baseline subtracted)."""
    from common.embedders import l2_normalise
    v = l2_normalise(np.asarray(neurons), np.float64)
    baseline = v @ l2_normalise(np.asarray(empty)[None], np.float64)[0]
    if not len(concepts):
        return np.zeros((len(v), 0)), baseline
    return v @ l2_normalise(np.asarray(concepts), np.float64).T - baseline[:, None], baseline


def best_alignment(neurons: np.ndarray, concepts: np.ndarray, empty: np.ndarray) -> Alignment:
    """Each neuron's best-aligned concept of ``concepts`` (rows: concept vectors in the neurons'
    space) and its alignment (see ``alignments``); ties go to the earlier concept."""
    scores, baseline = alignments(neurons, concepts, empty)
    n = len(baseline)
    if not scores.shape[1]:
        return Alignment(np.full(n, -np.inf), np.full(n, -1), np.full(n, np.nan), baseline)
    index = scores.argmax(axis=1)
    best = scores[np.arange(n), index]
    return Alignment(best, index, best + baseline, baseline)
