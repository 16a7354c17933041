"""Describe-and-Refine's loop over candidate sentences (stage 09): every neuron and sub-concept
starts from its candidates (03's sentence, its sub-concepts' sentences, the user's concepts),
each scored on the *selection* half of the held-out images; then, while the best one improves and
at most ``iterations`` times, the describer is shown the images the best sentence misses (the
neuron fires on them, the matcher ranks them low) and its answer joins the candidates.

The test half is never read here: every reported figure is measured there afterwards, on the
chosen sentence, so that choosing among candidates does not inflate it.

The matcher and the describer come in as two callables, so that each iteration costs one batched
matcher call (every new sentence of every layer) and one batched describer call (every unit that
still improves):
  score_more({layer: [sentence, …]}) → {layer: images × sentences}   (common/matchers.py)
  ask([Request, …]) → [answer, …]                                     ("" where none came)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from common.verification import verify_masks

MISS_TOP = 0.1     # a positive image is missed when the matcher ranks it outside its top 10 % …
MISS_TILES = 16    # … and the describer sees at most this many misses (strongest first, 4 × 4)
GAIN = 1e-9        # a new candidate must beat the best by more than this to count as better
SOURCES = ("sentence", "subconcept", "user", "refined")  # where a candidate comes from


@dataclass
class Unit:
    """What is refined: a neuron's own sentence (``subconcept`` 0) or a sub-concept's."""

    layer: str
    channel: int
    subconcept: int
    level: int                    # 03's abstraction level of the layer (the describer's prompt)
    held_out: np.ndarray          # bool over the usable images: selection half minus its mosaic
    first: str                    # the sentence it started from ("" when none)
    candidates: list[tuple[str, str]] = field(default_factory=list)  # (sentence, source), in order
    records: list[dict] = field(default_factory=list)  # every candidate scored, in order
    best: int = -1                # index in ``records`` of the best so far (-1: none scored)
    done: bool = False
    calls: int = 0                # describer calls made for it


@dataclass(frozen=True)
class Request:
    """One describer call: the unit's misses (usable-image rows, strongest first) and the
    sentence that missed them."""

    unit: Unit
    rows: np.ndarray
    sentence: str


def refine_prompt(prompts: dict, level: int, sentence: str, domain: str = "",
                  keywords: str = "") -> str:
    """The describer's prompt for the images a sentence misses: ``level``'s prompt (03's), then
    the prompt file's ``refine`` part with the sentence in it (the shipped file's part when the
    user's file has none)."""
    from common.describers import DEFAULT_PROMPTS, build_prompt, load_prompts
    extra = prompts.get("refine") or load_prompts(DEFAULT_PROMPTS)["refine"]
    return " ".join([build_prompt(prompts, level, domain, keywords),
                     " ".join(extra.split()).replace("{sentence}", sentence)])


def misses(scores: np.ndarray, activation: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    """Rows (of the usable images) where the neuron fires — its top 1 % of ``held_out`` by
    activation, as ``verify`` counts positives — but the matcher ranks the image outside its top
    ``MISS_TOP`` share of ``held_out`` (at least as many places as there are positives);
    strongest activation first."""
    _, keep, positive = verify_masks(scores, activation, held_out)
    if positive is None:
        return np.zeros(0, np.int64)
    rows = np.flatnonzero(keep)
    places = max(int(positive.sum()), math.ceil(MISS_TOP * len(rows)))
    order = np.argsort(-scores[rows], kind="stable")
    top = np.zeros(len(rows), bool)
    top[order[:places]] = True
    missed = rows[positive & ~top]
    return missed[np.argsort(-activation[missed], kind="stable")]


def _score(unit: Unit, column: np.ndarray, activation: np.ndarray) -> float:
    """The selection score of one candidate: Pearson r on the unit's selection-half images."""
    return float(verify_masks(column, activation, unit.held_out)[0]["corr"])


def _rank(score: float) -> float:
    """A score as a sort key: a candidate that could not be verified (NaN) ranks last."""
    return score if np.isfinite(score) else -math.inf


def refine(units: list[Unit], cache: dict[str, dict[str, np.ndarray]],
           activation: dict[str, np.ndarray], iterations: int,
           score_more: Callable[[dict[str, list[str]]], dict[str, np.ndarray]],
           ask: Callable[[list[Request]], list[str]]) -> None:
    """Run the loop on ``units`` in place (their ``records``, ``best``, ``calls``).

    ``cache``: layer → sentence → the matcher's scores of the usable images (filled with every
    new sentence); ``activation``: layer → usable images × channels (01's per-image maxima).
    Iteration 0 scores the starting candidates; each later one asks the describer about the
    misses of every unit whose best improved, and stops a unit when its answer does not beat the
    best (or brings nothing new). ``iterations`` 0: the starting candidates only, and the unit
    keeps its first sentence when it has one.
    """
    pending = {id(u): list(u.candidates) for u in units}
    for iteration in range(iterations + 1):
        more: dict[str, list[str]] = {}
        for u in units:
            for text, _ in pending[id(u)]:
                if text not in cache[u.layer] and text not in more.setdefault(u.layer, []):
                    more[u.layer].append(text)
        more = {layer: texts for layer, texts in more.items() if texts}
        if more:
            for layer, matrix in score_more(more).items():
                cache[layer].update({t: matrix[:, j] for j, t in enumerate(more[layer])})
        for u in units:
            if u.done:
                continue
            act = activation[u.layer][:, u.channel]
            start = len(u.records)
            for text, source in pending[id(u)]:
                u.records.append({"iteration": iteration, "source": source, "description": text,
                                  "score": _score(u, cache[u.layer][text], act)})
            new = range(start, len(u.records))
            challenger = max(new, key=lambda i: _rank(u.records[i]["score"]), default=-1)
            if iteration == 0 and iterations == 0 and u.first:
                u.best = start  # no refinement: the first sentence (listed first) stays
            elif iteration == 0:
                u.best = challenger  # the first best wins a tie: 03's sentence is listed first
            elif new and _rank(u.records[challenger]["score"]) > \
                    _rank(u.records[u.best]["score"]) + GAIN:
                u.best = challenger
            else:
                u.done = True  # this iteration did not improve the best: stop
            if iteration == iterations:
                u.done = True
        requests = []
        for u in units:
            pending[id(u)] = []
            if u.done or u.best < 0:
                u.done = True
                continue
            sentence = u.records[u.best]["description"]
            rows = misses(cache[u.layer][sentence], activation[u.layer][:, u.channel], u.held_out)
            if not len(rows):
                u.done = True  # nothing the best sentence misses: nothing to ask
                continue
            requests.append(Request(u, rows[:MISS_TILES], sentence))
        if not requests:
            break
        answers = ask(requests)
        for request, answer in zip(requests, answers):
            u = request.unit
            u.calls += 1
            seen = {r["description"] for r in u.records}
            if answer and answer not in seen:
                pending[id(u)] = [(answer, "refined")]
            else:
                u.done = True  # the describer said nothing new: the loop cannot improve
