"""Concept matchers: how much each image shows what a sentence says, to verify descriptions on
images the describer never saw (09_score).

Each matcher turns, per layer, a list of sentences and the run's images into a score matrix
(images × sentences); higher means "this image shows more of what the sentence says". Images that
cannot be decoded get NaN rows.

- ``clip``: cosine between the CLIP text vector of the sentence and the CLIP image vector of the
  whole network input (clip-anytorch, OpenCLIP, or transformers' CLIP or SigLIP). Sees anything CLIP knows, but always the whole image, not the part the
  neuron looks at.
- ``offline``: built only from what runs here. Two parts, each standardised over the images and
  averaged when both apply:
  * object words: the analysed model's own top-5 predictions for the image (01_predictions.csv),
    each class name embedded with the text embedder; the image's score is the probability-weighted
    cosine between the sentence and its predicted class names (minus the sentence's mean cosine
    over the classes that appear in any image's top 5: those are the only names an image is
    scored against, and the only ones embedded), where a sentence naming several things (split
    into ``phrases``) counts, for each class, its best-matching phrase — a class named in a list
    is not diluted by the rest. It sees only what the classifier's classes can name.
  * appearance words (colour names, vertical / horizontal / diagonal, edges, stripes, texture,
    contrast, bright / dark, smooth, mixed colours): measured in every receptive-field window of the
    layer (one per feature-map cell, at ANALYSIS_PX resolution) and the best window kept, as the
    neuron's per-image value is its best cell. 01 stores the argmax cell only for each neuron's top
    images, so on held-out images the window the neuron used is unknown: the best-matching window
    stands in for it, which favours sentences whose words co-occur anywhere in the image.
    The images are measured by forked worker processes (``workers``) that write into shared
    arrays, while the calling process embeds the sentences and class names for the object part.
"""
from __future__ import annotations

import logging
import math
import mmap
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from common.appearance import FEATURES, integral_image, pixel_maps, window_features
from common.images import BadImage, load_rgb, network_input
from common.fields import RF, crop_box
from common.processes import worker_pool
from common.threads import one_torch_thread

log = logging.getLogger("neuron-atlas.matchers")

ANALYSIS_PX = 112   # side at which appearance is measured (half the usual 224 input: 4× cheaper)
MAX_WINDOWS = 1024  # windows per image and layer; denser feature maps are sampled on a grid
NORM_IMAGES = 64    # images (seeded sample) whose windows set each feature's scale
KEEP_BYTES = 512 << 20  # most memory kept for scoring more sentences later (score_more)
CHUNKS_PER_WORKER = 8   # image chunks per worker process: evens out their progress
WORKER_NICENESS = 10    # worker processes yield the CPU to the process that forked them

_F = {name: i for i, name in enumerate(FEATURES)}
# Appearance words → (feature, weight). A word preceded by "low" or "no" counts negatively.
_COLOUR_WORDS = {"black": "black", "white": "white", "gray": "gray", "grey": "gray", "red": "red",
                 "orange": "orange", "yellow": "yellow", "green": "green", "cyan": "cyan",
                 "teal": "cyan", "blue": "blue", "purple": "purple", "violet": "purple",
                 "pink": "pink", "brown": "brown"}
_WORDS: dict[str, dict[str, float]] = {w: {f: 1.0} for w, f in _COLOUR_WORDS.items()}
_WORDS.update({
    "vertical": {"vertical": 1.0, "coherence": 0.5},
    "horizontal": {"vertical": -1.0, "coherence": 0.5},
    "diagonal": {"diagonal": 1.0, "coherence": 0.5},
    **{w: {"edges": 1.0} for w in ("edge", "edges", "line", "lines", "outline", "outlines",
                                  "contour", "contours")},
    **{w: {"edges": 1.0, "coherence": 1.0} for w in ("stripe", "stripes", "striped", "bars",
                                                     "grating", "grid")},
    **{w: {"edges": 1.0, "coherence": -1.0} for w in ("texture", "textured", "irregular",
                                                      "speckled", "noisy", "rough")},
    "contrast": {"contrast": 1.0},
    **{w: {"brightness": 1.0} for w in ("bright", "light", "pale")},
    "dark": {"brightness": -1.0},
    **{w: {"edges": -1.0} for w in ("smooth", "plain", "flat", "uniform")},
    **{w: {"colourfulness": 1.0} for w in ("mixed", "colourful", "colorful", "multicoloured",
                                           "multicolored")},
})
_NEGATORS = {"low", "no", "without", "little"}
# Words that carry no content of their own: a sentence made only of these and appearance words
# says nothing about objects, and the object part is left out for it.
_FILLER = {"and", "or", "with", "the", "a", "an", "of", "in", "on", "at", "to", "by", "as", "is",
           "are", "some", "top", "images", "image", "classified", "mostly", "also", "such", "mix",
           "high", "low", "no", "colours", "colors", "colour", "color", "patches", "patch",
           "pattern", "patterns", "areas", "area", "regions", "region", "shapes", "shape", "tones",
           "small", "large", "fine", "thin", "thick", "strong", "weak", "various", "many", "few",
           "little", "without", "other"}


def words(sentence: str) -> list[str]:
    """Lower-case word tokens of a sentence."""
    return re.findall(r"[a-z]+", sentence.lower())


def appearance_weights(sentence: str) -> np.ndarray:
    """Weights over FEATURES for the appearance words of ``sentence`` (sum of |w| = 1), or zeros."""
    w = np.zeros(len(FEATURES))
    tokens = words(sentence)
    for i, token in enumerate(tokens):
        sign = -1.0 if i > 0 and tokens[i - 1] in _NEGATORS else 1.0
        for feature, weight in _WORDS.get(token, {}).items():
            w[_F[feature]] += sign * weight
    total = np.abs(w).sum()
    return w / total if total > 0 else w


def phrases(sentence: str) -> list[str]:
    """The sentence's parts (split at commas, semicolons, "and", "or"), each without filler
    words, for the object part to compare one named thing at a time with a class name; the whole
    sentence when no part has content left. In "<kind> such as <examples>" the examples are what
    is named: the kind before them is dropped (else "objects such as palace" would be compared
    with class names as one phrase, "objects palace")."""
    parts = [re.split(r"\bsuch as\b", part)[-1]
             for part in re.split(r"[,;:.]|\band\b|\bor\b", sentence.lower())]
    kept = [" ".join(w for w in words(part) if w not in _FILLER) for part in parts]
    kept = [part for part in kept if part]
    return kept or [sentence]


def has_object_words(sentence: str) -> bool:
    """True when the sentence has a content word that is neither an appearance word nor filler."""
    return any(t not in _WORDS and t not in _FILLER and len(t) > 2 for t in words(sentence))


def network_inputs(paths: Sequence[str], size: int) -> Iterable[tuple[int, np.ndarray | None]]:
    """``(index, RGB uint8 array of the network input)`` per path; None for an unreadable file."""
    for i, path in enumerate(paths):
        try:
            img, _ = load_rgb(path)
        except BadImage as err:
            log.warning("image %s unreadable now (%s): left out of verification", path, err.reason)
            yield i, None
            continue
        yield i, np.asarray(network_input(img, size), dtype=np.uint8)


def layer_windows(rf: np.ndarray, fmap_hw: tuple[int, int], input_size: int) -> np.ndarray:
    """Boxes (n × 4: top, left, bottom, right) at ANALYSIS_PX scale of the layer's cells' fields
    clipped to the image; a grid sample of cells when there are more than MAX_WINDOWS."""
    field = RF(*[float(v) for v in rf])
    height, width = fmap_hw
    step = max(1, int(np.ceil(np.sqrt(height * width / MAX_WINDOWS))))
    scale = ANALYSIS_PX / input_size
    boxes = []
    for y in range(0, height, step):
        for x in range(0, width, step):
            top, left, bottom, right = crop_box(field, y, x, input_size, input_size)
            box = [int(round(v * scale)) for v in (top, left, bottom, right)]
            box[2], box[3] = max(box[2], box[0] + 1), max(box[3], box[1] + 1)
            boxes.append([min(v, ANALYSIS_PX) for v in box[:2]] + box[2:])
    boxes = np.clip(np.array(boxes, dtype=np.int64), 0, ANALYSIS_PX)
    return np.unique(boxes, axis=0)


def _standardise(columns: np.ndarray) -> np.ndarray:
    """Each column centred and scaled to unit standard deviation over its finite rows (columns
    with no finite row stay NaN)."""
    finite = np.isfinite(columns)
    count = np.maximum(finite.sum(axis=0), 1)
    filled = np.where(finite, columns, 0.0)
    mean = filled.sum(axis=0) / count
    std = np.sqrt((np.where(finite, columns - mean, 0.0) ** 2).sum(axis=0) / count)
    return (columns - mean) / np.where(std > 0, std, 1.0)


def shrink(pixels: np.ndarray) -> np.ndarray:
    """The network input at ANALYSIS_PX resolution."""
    if pixels.shape[0] == ANALYSIS_PX:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((ANALYSIS_PX, ANALYSIS_PX), Image.BILINEAR))


def _shared_array(shape: tuple[int, ...], shared: bool, dtype=np.float64) -> np.ndarray:
    """An array of NaN; with ``shared``, in memory that processes forked later write to (an
    anonymous shared mapping), so that worker processes fill it without copies."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    if not shared or size == 0:
        return np.full(shape, np.nan, dtype=dtype)
    out = np.frombuffer(mmap.mmap(-1, size), dtype=dtype).reshape(shape)
    out.fill(np.nan)
    return out


@dataclass
class ImagePass:
    """One pass of the offline matcher over the images, in image chunks that worker processes
    (or this one) measure: every image's windows of each layer, scaled by ``feature_scales``, go
    through the appearance weights of the layer's sentences, and the best window is written into
    ``appearance[layer]`` (images × sentences); the layers in ``kept`` also keep every window's
    scaled features (images × windows × features) for ``score_more``."""

    paths: list[str]
    input_size: int
    windows: dict[str, np.ndarray]  # layer → window boxes
    weights: dict[str, np.ndarray]  # layer → FEATURES × sentences
    appearance: dict[str, np.ndarray]  # layer → images × sentences (written here)
    kept: dict[str, np.ndarray]  # layer → images × windows × FEATURES (written here)
    scales: dict[str, np.ndarray] | None = None  # feature_scales, once per process


_PASS: ImagePass | None = None  # the pass a worker process measures (set when it starts)


def _start_worker(job: ImagePass) -> None:
    """Worker process start: remember the pass (inherited at fork, nothing is copied)."""
    global _PASS
    _PASS = job


def _start_pool_worker(job: ImagePass) -> None:
    """Start of a forked worker: ``_start_worker``, at a lower priority than the process that
    forked it, whose own work (09 loads its text embedder and starts 03 meanwhile) is what the
    pass waits for in the end; the workers take the CPU time it leaves."""
    os.nice(WORKER_NICENESS)
    _start_worker(job)


def _features(pixels: np.ndarray, windows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Unscaled FEATURES of every window of each layer in one network input."""
    table = integral_image(pixel_maps(shrink(pixels)))
    return {layer: window_features(table, boxes) for layer, boxes in windows.items()}


def feature_scales(job: ImagePass) -> dict[str, np.ndarray]:
    """Per layer, each feature's standard deviation over the windows of a seeded sample of
    images, so that one unit of every word weighs the same (colour shares, gradients and
    orientation ratios have very different spreads). Each worker process computes it itself, on
    the same sample, so that none waits for another before measuring."""
    if job.scales is None:
        rng = np.random.default_rng(0)
        n = len(job.paths)
        sample = sorted(rng.choice(n, size=min(NORM_IMAGES, n), replace=False))
        collected: dict[str, list[np.ndarray]] = {layer: [] for layer in job.windows}
        for _, pixels in network_inputs([job.paths[i] for i in sample], job.input_size):
            if pixels is not None:
                for layer, feats in _features(pixels, job.windows).items():
                    collected[layer].append(feats)
        job.scales = {}
        for layer, feats in collected.items():
            std = np.concatenate(feats).std(axis=0) if feats else np.ones(len(FEATURES))
            job.scales[layer] = np.where(std > 1e-9, std, 1.0)
    return job.scales


def _measure(task: tuple[int, int]) -> int:
    """Worker task: measure images [start, stop); write their rows of the pass's shared arrays;
    return how many images were measured."""
    start, stop = task
    job = _PASS
    scales = feature_scales(job)
    for offset, pixels in network_inputs(job.paths[start:stop], job.input_size):
        if pixels is None:
            continue
        i = start + offset
        for layer, feats in _features(pixels, job.windows).items():
            w = job.weights.get(layer)
            # Rounded to float32 here, kept so, and scored from these values now or later
            # (score_more): the same scores either way, at half the memory.
            feats = (feats / scales[layer]).astype(np.float32)
            if layer in job.kept:
                job.kept[layer][i] = feats
            if w is not None and w.shape[1]:
                job.appearance[layer][i] = (feats @ w).max(axis=0)
    return stop - start


@contextmanager
def _workers(job: ImagePass, workers: int):
    """``map``-like runner of the pass's tasks: a pool of ``workers`` forked processes (which
    share ``job``'s arrays), or this process for one worker. Forked workers start with what this
    process imported and copy nothing back."""
    if workers <= 1:
        _start_worker(job)
        try:
            yield map
        finally:
            _start_worker(None)
        return
    with worker_pool(workers, "09 image pass", _start_pool_worker, (job,)) as pool:
        yield pool.map


def _chunks(n: int, workers: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering ``n`` images, CHUNKS_PER_WORKER per worker."""
    size = max(1, math.ceil(n / (max(workers, 1) * CHUNKS_PER_WORKER)))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


class OfflineMatcher:
    """Object words from the model's own predictions, appearance words measured in the image."""

    name = "offline"

    def __init__(self, text_embedder, class_names: Sequence[str], top5_idx: np.ndarray,
                 top5_prob: np.ndarray, workers: int = 1):
        """``text_embedder``: an embedder, or a function that loads one (called when the object
        part first needs it, so that loading overlaps the image pass); ``top5_idx``/``top5_prob``:
        N × 5 per image (−1 / 0 where 01 has no prediction); ``workers``: processes that measure
        the images (1: this one)."""
        self._text = text_embedder
        self.class_names = list(class_names)
        self.top5_idx, self.top5_prob = top5_idx, top5_prob
        self.workers = workers
        valid = top5_idx >= 0
        self._shown = np.unique(top5_idx[valid])  # classes in some image's top 5 (sorted)
        self._column = np.searchsorted(self._shown, np.where(valid, top5_idx, 0))  # N × 5
        self._class_vectors = None              # of the classes in ``_shown``
        self._phrase_vectors: dict[str, np.ndarray] = {}  # each phrase is embedded once
        self._kept: dict[str, np.ndarray] = {}  # layer → images × windows × scaled features
        self._last: tuple | None = None         # the last score()'s images and geometry

    @property
    def text_embedder(self):
        """The text embedder, loaded on first use when a loader was given."""
        if not hasattr(self._text, "encode"):
            self._text = self._text()
        return self._text

    def _object_scores(self, sentences: Sequence[str]) -> np.ndarray:
        """N × S: probability-weighted cosine between each sentence (its best phrase per class)
        and the image's top-5 names, less the sentence's mean over the classes shown."""
        if not len(self._shown):  # no image has a prediction: nothing to compare with
            return np.zeros((len(self.top5_idx), len(sentences)))
        pieces = [phrases(s) for s in sentences]
        new = list(dict.fromkeys(p for ps in pieces for p in ps if p not in self._phrase_vectors))
        with one_torch_thread():  # see common/threads.py
            if self._class_vectors is None:
                self._class_vectors = self.text_embedder.encode(
                    [self.class_names[c].replace("_", " ") for c in self._shown])
            if new:
                self._phrase_vectors.update(zip(new, self.text_embedder.encode(new)))
        cos = np.zeros((len(sentences), len(self._shown)))
        for i, ps in enumerate(pieces):
            vectors = np.stack([self._phrase_vectors[p] for p in ps])
            cos[i] = (vectors @ self._class_vectors.T).max(axis=0)
        cos = cos - cos.mean(axis=1, keepdims=True)
        gathered = cos.T[self._column]  # N × 5 × S
        return np.einsum("nk,nks->ns", np.where(self.top5_idx >= 0, self.top5_prob, 0.0),
                         gathered)

    def score(self, sentences_by_layer: dict[str, list[str]], paths: Sequence[str],
              input_size: int, layer_geometry: dict[str, tuple[np.ndarray, tuple[int, int]]],
              progress: Callable[[Iterable], Iterable] = lambda it: it,
              keep: Sequence[str] = (),
              meanwhile: Callable[[], object] = lambda: None) -> dict[str, np.ndarray]:
        """Per layer: N_images × S score matrix for its sentences (rows in ``paths`` order).

        ``layer_geometry``: layer → (rf array, feature-map (H, W)). Every image is decoded once,
        by ``workers`` processes; meanwhile this one calls ``meanwhile()`` (the caller's own work)
        and then embeds the sentences for the object part. The window features of the layers in
        ``keep`` are kept (while they fit in KEEP_BYTES), so that ``score_more`` can score more
        sentences of those layers on the same images without decoding them again.
        """
        windows = {layer: layer_windows(*layer_geometry[layer], input_size)
                   for layer in {lay for lay, sents in sentences_by_layer.items() if sents} |
                   set(keep)}
        n = len(paths)
        if not self.keeps(keep, n, input_size, layer_geometry):
            log.info("window features of %d images would take over %d MiB: more sentences will "
                     "need another pass over the images", n, KEEP_BYTES >> 20)
            keep = ()
        self._last = (list(paths), input_size, dict(layer_geometry))
        weights = {layer: self._weights(sents) for layer, sents in sentences_by_layer.items()}
        shared = self.workers > 1
        job = ImagePass(
            list(paths), input_size, windows, weights,
            {layer: _shared_array((n, w.shape[1]), shared) for layer, w in weights.items()},
            {layer: _shared_array((n, len(windows[layer]), len(FEATURES)), shared, np.float32)
             for layer in keep})
        with _workers(job, self.workers) as run:
            done = run(_measure, _chunks(n, self.workers))
            meanwhile()
            # The object part needs no image: it is computed while the workers measure them.
            objects = {layer: self._object_scores(sents) if sents else None
                       for layer, sents in sentences_by_layer.items()}
            for _ in progress(i for count in done for i in range(count)):
                pass
        self._kept = job.kept
        return {layer: self._combine(sents, weights[layer], job.appearance[layer],
                                     objects[layer])
                for layer, sents in sentences_by_layer.items()}

    @staticmethod
    def keeps(layers: Sequence[str], n_images: int, input_size: int,
              layer_geometry: dict[str, tuple[np.ndarray, tuple[int, int]]]) -> bool:
        """Whether ``score`` can keep the window features of ``layers`` for ``n_images`` images
        (float32, at most KEEP_BYTES)."""
        size = sum(n_images * len(layer_windows(*layer_geometry[layer], input_size)) *
                   len(FEATURES) * 4 for layer in layers)
        return size <= KEEP_BYTES

    def score_more(self, sentences_by_layer: dict[str, list[str]],
                   progress: Callable[[Iterable], Iterable] = lambda it: it
                   ) -> dict[str, np.ndarray]:
        """``score`` of more sentences on the images of the last ``score`` call: from the kept
        window features when that call kept the layer's, else with a new pass over the images.
        Each sentence's scores are the same as ``score`` would give it (every column is computed
        and standardised on its own)."""
        if self._last is None:
            raise ValueError("score_more needs an earlier score() call")
        paths, input_size, geometry = self._last
        if not all(layer in self._kept for layer in sentences_by_layer):
            return self.score(sentences_by_layer, paths, input_size, geometry, progress)
        out = {}
        for layer, sents in sentences_by_layer.items():
            w = self._weights(sents)
            feats = self._kept[layer]
            appearance = np.full((len(paths), w.shape[1]), np.nan)
            if w.shape[1]:
                for i in np.flatnonzero(~np.isnan(feats[:, 0, 0])):  # readable images
                    appearance[i] = (feats[i] @ w).max(axis=0)
            out[layer] = self._combine(sents, w, appearance,
                                       self._object_scores(sents) if sents else None)
        return out

    @staticmethod
    def _weights(sentences: Sequence[str]) -> np.ndarray:
        """FEATURES × S appearance weights of the sentences."""
        return np.stack([appearance_weights(s) for s in sentences]).T if len(sentences) \
            else np.zeros((len(FEATURES), 0))

    @staticmethod
    def _combine(sentences: Sequence[str], weights: np.ndarray, appearance: np.ndarray,
                 objects: np.ndarray | None) -> np.ndarray:
        """N × S scores: the standardised appearance and object parts averaged where both apply
        (``appearance``: N × S best-window values, NaN rows for unreadable images; ``objects``:
        ``_object_scores`` of the sentences)."""
        n = len(appearance)
        if not len(sentences):
            return np.zeros((n, 0))
        has_look = np.abs(weights).sum(axis=0) > 0
        has_obj = np.array([has_object_words(s) for s in sentences])
        look = _standardise(np.where(has_look, appearance, np.nan))
        obj = np.where(has_obj | ~has_look, objects, np.nan)
        obj[np.isnan(appearance)] = np.nan  # unreadable image: no score at all
        obj = _standardise(obj)
        count = (~np.isnan(look)).astype(float) + (~np.isnan(obj))
        total = np.nan_to_num(look) + np.nan_to_num(obj)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


class ClipMatcher:
    """Cosine between CLIP's text vector of the sentence and its image vector of the whole input."""

    name = "clip"

    def __init__(self, text_tower, image_tower):
        """Both towers of one CLIP model (``common.embedders.ClipEmbedder``)."""
        self.text_tower, self.image_tower = text_tower, image_tower
        self._vectors: np.ndarray | None = None  # image vectors of the last score() call

    @classmethod
    def load(cls, model: str, device: str = "auto") -> "ClipMatcher":
        """The matcher of CLIP-like ``model``: clip-anytorch, OpenCLIP, or transformers' CLIP or
        SigLIP (the names ``common.embedders.load_clip_towers`` takes), loaded once."""
        from common.embedders import load_clip_towers
        return cls(*load_clip_towers(model, device))

    @staticmethod
    def keeps(layers: Sequence[str], n_images: int, input_size: int, layer_geometry=None) -> bool:
        """Always: the image vectors (one per image) are kept whatever the layers."""
        return True

    def score(self, sentences_by_layer: dict[str, list[str]], paths: Sequence[str],
              input_size: int, layer_geometry=None,
              progress: Callable[[Iterable], Iterable] = lambda it: it,
              keep: Sequence[str] = (),
              meanwhile: Callable[[], object] = lambda: None) -> dict[str, np.ndarray]:
        """Per layer: N_images × S cosine matrix (the layer does not matter: whole images). The
        image vectors are always kept for ``score_more`` (``keep`` is accepted for the offline
        matcher's sake); ``meanwhile()`` is called first."""
        meanwhile()
        vectors = np.full((len(paths), self.image_tower.dim), np.nan, np.float32)
        batch: list[tuple[int, Image.Image]] = []

        def flush():
            """Embed the pending images."""
            if batch:
                vectors[[i for i, _ in batch]] = self.image_tower.encode([im for _, im in batch])
                batch.clear()
        for i, pixels in progress(network_inputs(paths, input_size)):
            if pixels is not None:
                batch.append((i, Image.fromarray(pixels)))
            if len(batch) >= 64:
                flush()
        flush()
        self._vectors = vectors
        return self.score_more(sentences_by_layer)

    def score_more(self, sentences_by_layer: dict[str, list[str]],
                   progress: Callable[[Iterable], Iterable] = lambda it: it
                   ) -> dict[str, np.ndarray]:
        """Cosines of more sentences with the images of the last ``score`` call."""
        if self._vectors is None:
            raise ValueError("score_more needs an earlier score() call")
        return {layer: self._vectors @ self.text_tower.encode(list(sents)).T if sents
                else np.zeros((len(self._vectors), 0))
                for layer, sents in sentences_by_layer.items()}
