"""Semantic search over a run's neurons: the index of 04's vectors and the query answerer.

Shared by 07_search (command line) and 10_atlas (``serve``: the atlas's live search). A text query
is embedded with the text model that 04 used and compared (cosine) with the neurons' text
embeddings, ranked by plain cosine by default, or by the cosine minus that of a content-free
sentence (SemanticLens's empty-template baseline), or by a z-score against the neuron's cosines
with generic queries. An image query is compared with the neurons' image embeddings, and refused
when the image embedder available is not the one 04 used.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from common.artefacts import description_texts, read_descriptions, read_embeddings, read_mosaics
from common.cli import StageError

DEFAULT_BASELINE = "a picture of various things"  # a description that says nothing specific
SCORINGS = ("cosine", "baseline", "neuron")  # how a text query's cosines may be ranked
DEFAULT_SCORING = "cosine"  # ranked best on the demo, tied elsewhere; Eq. 4's empty-text
# baseline ranked worse on the demo (bench/bench_search.py, figures in docs/search.md)
# A hit whose cosine with the query is below this is a weak match, shown as such (and a query
# whose best hit is weak has no good match). Measured with all-MiniLM-L6-v2 on the demo
# (bench/bench_search.py, docs/search.md#no-good-match): the best hit of all but 2 of 24 queries
# for things the demo's neurons show reaches it (0.31-0.85), of all but 2 of 23 queries for
# things the demo lacks stays below it (0.22-0.48): the fewest misjudged of 0.30 ... 0.50.
WEAK_BELOW = 0.4
GENERIC_QUERIES = (  # queries that name no particular concept: a neuron's usual response to a query
    "an object", "a thing", "a texture", "a pattern", "a shape", "a colour", "edges and lines",
    "a picture", "an animal", "a person", "a scene", "a building", "a vehicle", "food",
    "clothing", "a plant", "a tool", "text", "a surface", "the background")


class NeuronIndex:
    """Every neuron of a run with its vectors, description and mosaic, in 04's row order."""

    def __init__(self, layers: np.ndarray, channels: np.ndarray, text: np.ndarray,
                 image: np.ndarray | None, text_model: str, image_model: str,
                 descriptions: list[str], mosaics: list[Path | None]):
        """Hold the arrays; ``text``/``image`` rows are unit vectors (zero rows: missing)."""
        self.layers = layers              # (N,) str
        self.channels = channels          # (N,) int64
        self.text = text                  # (N, Dt) float32
        self.image = image                # (N, Di) float32, or None when 04 stored none
        self.text_model = text_model
        self.image_model = image_model
        self.descriptions = descriptions
        self.mosaics = mosaics

    def select_layers(self, wanted: list[str]) -> "NeuronIndex":
        """The neurons of the ``wanted`` layers only; an unknown layer name is an error."""
        known = list(dict.fromkeys(self.layers.tolist()))
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise StageError(f"--layers: {', '.join(unknown)} not in 04_embeddings.npz; "
                             f"layers there: {', '.join(known)}")
        return self.select(np.isin(self.layers, wanted))

    def select(self, keep: np.ndarray) -> "NeuronIndex":
        """The neurons where the boolean mask ``keep`` is true."""
        rows = np.flatnonzero(keep)
        return NeuronIndex(self.layers[keep], self.channels[keep], self.text[keep],
                           None if self.image is None else self.image[keep], self.text_model,
                           self.image_model, [self.descriptions[i] for i in rows],
                           [self.mosaics[i] for i in rows])


def load_index(path: Path, descriptions_path: Path, mosaics_path: Path) -> NeuronIndex:
    """Read 04_embeddings.npz and join the description and mosaic of each neuron."""
    emb = read_embeddings(path)
    descriptions = description_texts(read_descriptions(descriptions_path, required=False))
    mosaics = {m.key: m.path for m in read_mosaics(mosaics_path, required=False)}
    keys = emb.keys()
    return NeuronIndex(layers=emb.layer, channels=emb.channel, text=emb.text, image=emb.image,
                       text_model=emb.text_model, image_model=emb.image_model,
                       descriptions=[descriptions.get(k, "") for k in keys],
                       mosaics=[mosaics.get(k) for k in keys])


def embedder_matches(embedder, stored: str) -> bool:
    """True when ``embedder`` is the model whose name (or vector-space id) 04 stored."""
    return stored in {getattr(embedder, "name", None), getattr(embedder, "space_id", None)}


def is_clip_name(name: str) -> bool:
    """True for a clip-anytorch model name (``ViT-B/32``, ``RN50x4`` …) or checkpoint file."""
    pattern = r"RN\d+(x\d+)?|ViT-[BLH]/\d+(@\d+px)?"
    return name.endswith(".pt") or re.fullmatch(pattern, name) is not None


def loader_name(stored: str, kind: str) -> str:
    """The name to give ``load_text_embedder`` / ``load_image_embedder`` to get back ``stored``.

    04 records an embedder's ``name``: a sentence-transformers id or folder for text, a CLIP model
    name for either tower, or the reference CNN's model name for images.
    """
    if stored.startswith("clip:"):
        return stored
    if is_clip_name(stored):
        return f"clip:{stored}"
    if kind == "text":
        return stored
    return "cnn"  # the reference CNN's pooled feature, whatever its recorded model name


def check_embedder(embedder, stored: str, vectors: np.ndarray, kind: str) -> None:
    """Refuse a query embedder whose space differs from the one the neurons were embedded in."""
    if not embedder_matches(embedder, stored):
        raise StageError(
            f"the {kind} embeddings in 04_embeddings.npz were made with {stored!r}, but the {kind} "
            f"embedder here is {getattr(embedder, 'name', '?')!r} (space "
            f"{getattr(embedder, 'space_id', getattr(embedder, 'space', '?'))!r}); their vectors "
            f"cannot be compared. Make that model available here, or re-run 04 with this one")
    if embedder.dim != vectors.shape[1]:
        raise StageError(f"the {kind} embedder gives {embedder.dim}-d vectors but 04 stored "
                         f"{vectors.shape[1]}-d ones; re-run 04")


class Searcher:
    """Answers queries over a ``NeuronIndex``; embedders and the baseline are prepared once.

    A warm query costs one embedding and one matrix-vector product over all neurons.
    """

    def __init__(self, index: NeuronIndex, text_embedder=None, image_embedder=None,
                 scoring: str = DEFAULT_SCORING, baseline: str = DEFAULT_BASELINE,
                 weak_below: float = WEAK_BELOW):
        """Check the embedders against the index and precompute what ``scoring`` needs.

        Scorings of a text query: ``cosine``; ``baseline``: minus the neuron's cosine with the
        ``baseline`` sentence; ``neuron``: a z-score of the cosine against the neuron's cosines
        with GENERIC_QUERIES. A text hit whose cosine is below ``weak_below`` is marked weak.
        """
        if scoring not in SCORINGS:
            raise StageError(f"unknown scoring {scoring!r}: one of {', '.join(SCORINGS)}")
        self.index = index
        self.text_embedder = text_embedder
        self.image_embedder = image_embedder
        self.scoring, self.baseline, self.weak_below = scoring, baseline, weak_below
        # Neurons without a description (zero vector) would score 0 and outrank real neurons
        # with a negative normalised score, so they are left out of text search.
        self._has_text = np.linalg.norm(index.text, axis=1) > 0
        self._offset = np.zeros(len(index.layers), np.float32)
        self._scale = np.ones(len(index.layers), np.float32)
        if text_embedder is not None:
            check_embedder(text_embedder, index.text_model, index.text, "text")
            if scoring == "baseline":
                self._offset = index.text @ text_embedder.encode([baseline])[0]
            elif scoring == "neuron":
                usual = index.text @ text_embedder.encode(list(GENERIC_QUERIES)).T
                self._offset = usual.mean(axis=1)
                self._scale = np.maximum(usual.std(axis=1), 1e-3)  # a zero row stays finite
        if image_embedder is not None:
            if index.image is None:
                raise StageError("04_embeddings.npz holds no image embeddings, so an image query "
                                 "has nothing to match; re-run 04 with an image embedder")
            check_embedder(image_embedder, index.image_model, index.image, "image")

    def describe_scoring(self) -> str:
        """One line saying how text scores are made, printed above each answer."""
        return {"cosine": "score = cosine",
                "baseline": f'score = cosine − cosine of "{self.baseline}"',
                "neuron": f"score = z of the cosine against the neuron's cosines with "
                          f"{len(GENERIC_QUERIES)} generic queries"}[self.scoring]

    def search_text(self, query: str, top_k: int, layers: list[str] | None = None) -> list[dict]:
        """Top-k neurons for a text query, ranked by the chosen scoring of their cosines (only
        those of ``layers`` when given)."""
        cosine = self.index.text @ self.text_embedder.encode([query])[0]
        score = (cosine - self._offset) / self._scale
        return self._hits(query, cosine, score, self._has_text, top_k, layers, self.weak_below)

    def search_image(self, image, label: str, top_k: int,
                     layers: list[str] | None = None) -> list[dict]:
        """Top-k neurons for an example image (a PIL image), ranked by cosine (only those of
        ``layers`` when given); none is marked weak, as the threshold is a text one."""
        q = self.image_embedder.encode([image])[0]
        cosine = self.index.image @ q
        valid = np.linalg.norm(self.index.image, axis=1) > 0
        return self._hits(label, cosine, cosine, valid, top_k, layers)

    def _hits(self, query: str, cosine: np.ndarray, score: np.ndarray, valid: np.ndarray,
              top_k: int, layers: list[str] | None = None,
              weak_below: float | None = None) -> list[dict]:
        """Rows of the ``top_k`` best ``score``s among ``valid`` neurons (of ``layers`` when
        given; ties: 04's row order); ``weak`` marks a cosine below ``weak_below``."""
        if layers:
            valid = valid & np.isin(self.index.layers, layers)
        candidates = np.flatnonzero(valid)
        # a stable sort keeps 04's row order among equal scores, at the top-k cut too
        best = candidates[np.argsort(-score[candidates], kind="stable")[:top_k]]
        ix = self.index
        return [{"query": query, "rank": r + 1, "layer": str(ix.layers[i]),
                 "channel": int(ix.channels[i]), "score": round(float(score[i]), 4),
                 "cosine": round(float(cosine[i]), 4), "weak": weak_below is not None and bool(cosine[i] < weak_below),
                 "description": ix.descriptions[i],
                 "mosaic": "" if ix.mosaics[i] is None else str(ix.mosaics[i])}
                for r, i in enumerate(best)]
