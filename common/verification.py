"""Verification of sentences against a neuron's activations (SIEVE's verification step), shared
by stage 09 (every neuron's sentence and its sub-concepts') and stage 14 (two describers' sentences
of the same neurons).

A concept matcher (common/matchers.py) scores every usable image of the run for each sentence; a
sentence is verified by the Pearson correlation and the AUPRC of those scores against the
neuron's per-image maximum, on the images its mosaic did not show (held out), beside the same for
a control sentence: another neuron's sentence of the same layer, drawn with a seed.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from common.artefacts import (CropVectors, Description, Mosaic, Run, read_activations,
                              read_crop_vectors, read_descriptions, read_images, read_mosaics,
                              read_predictions)
from common.provenance import merge_lineage, read_meta

POSITIVE_SHARE = 0.01  # AUPRC positives: the top 1 % of held-out images by activation …
MIN_POSITIVES = 5      # … and at least this many


# ---------------------------------------------------------------------------------------------
# Reading the run's artefacts (what verification reads from stages 01–04)


@dataclass
class RunInputs:
    """Everything 09 reads from stages 01–04."""

    layers: list[str]
    input_size: int
    tops: dict               # layer → common.artefacts.LayerTopK
    stats_dir: Path
    image_paths: list[str]   # by image id
    usable: np.ndarray       # bool per image id: status ok
    top5_idx: np.ndarray     # N × 5 (−1 where no prediction)
    top5_prob: np.ndarray    # N × 5
    mosaics: dict[tuple[str, int], Mosaic]             # 02's index rows by neuron
    descriptions: dict[tuple[str, int], Description]   # 03's rows by neuron
    metas: list[dict]        # metas of the inputs, for the lineage check and ours
    crops: CropVectors       # 04's vector of each top crop
    describer_backend: str   # 03's backend (offline describers read class names)
    class_names: list[str]   # the model's class names by index (ImageNet's, or 01's pred_name)


@dataclass
class ImageTable:
    """What a concept matcher needs of a run's images: every image's path (by image id), which are
    usable (status ok), 01's top-5 predictions and the model's class names."""

    image_paths: list[str]   # by image id
    usable: np.ndarray       # bool per image id: status ok
    top5_idx: np.ndarray     # N × 5 (−1 where no prediction)
    top5_prob: np.ndarray    # N × 5
    class_names: list[str]   # the model's class names by index (ImageNet's, or 01's pred_name)


def read_image_table(run: Run) -> ImageTable:
    """``run``'s ImageTable, from 01_images.csv and 01_predictions.csv."""
    rows = read_images(run.images)
    top5_idx = np.full((len(rows), 5), -1, np.int64)
    top5_prob = np.zeros((len(rows), 5))
    predicted = {}
    for p in read_predictions(run.predictions):
        predicted[p.pred_idx] = p.pred_name
        n = min(len(p.top5_idx), 5)
        top5_idx[p.image_id, :n] = p.top5_idx[:n]
        top5_prob[p.image_id, :n] = p.top5_prob[:n]
    return ImageTable(image_paths=[r.path for r in rows],
                      usable=np.array([r.status == "ok" for r in rows]),
                      top5_idx=top5_idx, top5_prob=top5_prob,
                      class_names=model_class_names(predicted,
                                                    int(top5_idx.max(initial=-1)) + 1))


def read_inputs(run: Run) -> RunInputs:
    """Read and cross-check 09's inputs in ``run``; refuse inputs that come from different
    runs."""
    activations, stats_dir = run.activations, run.stats
    mosaics, descriptions, embeddings = run.mosaics, run.descriptions, run.embeddings
    crop_vectors = run.crop_vectors
    metas = [read_meta(p) for p in (activations, mosaics, descriptions, embeddings, stats_dir)]
    read_meta(crop_vectors)  # written by the same 04 run as the embeddings, byte for byte
    merge_lineage(metas)
    layers, input_size, tops = read_activations(activations)
    table = read_image_table(run)
    index = {m.key: m for m in read_mosaics(mosaics)}
    described = {d.key: d for d in read_descriptions(descriptions)}
    return RunInputs(class_names=table.class_names,
                     layers=layers, input_size=int(input_size[0]), tops=tops,
                     stats_dir=stats_dir, image_paths=table.image_paths, usable=table.usable,
                     top5_idx=table.top5_idx, top5_prob=table.top5_prob, mosaics=index,
                     descriptions=described, metas=metas,
                     crops=read_crop_vectors(crop_vectors),
                     describer_backend=str(metas[2].get("backend", "")))


def model_class_names(predicted: dict[int, str], n_classes: int) -> list[str]:
    """Names of the model's classes by index: ImageNet's when 01's predicted names are ImageNet
    names, else the names 01 wrote (the index itself for a class never predicted top-1)."""
    from common.imagenet import class_names
    imagenet = class_names()
    if predicted and all(i < len(imagenet) and imagenet[i] == name
                         for i, name in predicted.items()):
        return imagenet
    return [predicted.get(i) or str(i) for i in range(max([n_classes, *(c + 1 for c in predicted)]))]


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass
class Sentence:
    """One sentence to verify: whose it is, which images its mosaic showed, and its control."""

    layer: str
    channel: int
    subconcept: int          # 0 for the neuron's own sentence
    text: str
    shown: np.ndarray        # image ids in its mosaic (not held out)
    control: int = -1        # index (in the layer's list) of the control sentence


def load_matcher(name: str, inputs: RunInputs | ImageTable, text_model: str, device: str,
                 workers: int):
    """The concept matcher ``name`` for this run (``inputs``: its RunInputs, or its ImageTable
    where nothing else is read, as in 13's audit): ``offline``, or ``clip`` / ``clip:<model>``
    (the two towers of that CLIP-like model, ``common.embedders.load_clip_towers``); the offline
    one measures the images in ``workers`` processes and loads its text embedder meanwhile."""
    from common.matchers import ClipMatcher, OfflineMatcher
    if name == "clip" or name.startswith("clip:"):
        return ClipMatcher.load(name, device)
    from common.embedders import load_text_embedder
    usable = inputs.usable  # the matcher scores usable images only, in image-id order
    return OfflineMatcher(lambda: load_text_embedder(text_model, device=device),
                          inputs.class_names, inputs.top5_idx[usable], inputs.top5_prob[usable],
                          workers=workers)


def positives(activation: np.ndarray) -> np.ndarray:
    """Where the neuron counts as firing among these images: its top ``POSITIVE_SHARE`` by
    activation, at least ``MIN_POSITIVES`` images, ties at the threshold included — the positives
    of the AUPRC, of the refinement's misses and of the Activation Rate (on retrieved or on
    generated images)."""
    from common.scores import top_share_positives
    return top_share_positives(activation, POSITIVE_SHARE, MIN_POSITIVES)


def verify(scores: np.ndarray, activation: np.ndarray, held_out: np.ndarray) -> dict:
    """Pearson and AUPRC of one sentence's matcher scores against the activation, on held-out
    images with a finite score."""
    return verify_masks(scores, activation, held_out)[0]


def verify_masks(scores: np.ndarray, activation: np.ndarray, held_out: np.ndarray
                 ) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """``verify``'s figures with the masks behind them: the images measured (``keep``, over all
    images) and, among those, the positives (the top 1 % by activation; None when too few images
    are kept to verify) — so that ``measure`` and the refinement do not compute them again."""
    from common.scores import average_precision, pearson
    keep = held_out & np.isfinite(scores) & np.isfinite(activation)
    if keep.sum() < 2 * MIN_POSITIVES:
        return ({"corr": float("nan"), "auprc": float("nan"), "n": int(keep.sum()), "pos": 0},
                keep, None)
    positive = positives(activation[keep])
    return ({"corr": pearson(scores[keep], activation[keep]),
             "auprc": average_precision(positive, scores[keep]), "n": int(keep.sum()),
             "pos": int(positive.sum())}, keep, positive)


def pick_controls(sentences: list[Sentence], rng: np.random.Generator) -> None:
    """Give each sentence of a layer a control: the sentence of another neuron of the layer,
    drawn at random among those that say something else — each has a word the other lacks, so
    neither the same sentence nor one that only adds a clause to it ("…, mostly espresso" against
    "…, mostly espresso; also man-made objects"), which would only tie with it. Failing those,
    among the other sentences with different text, then among all other neurons."""
    from common.matchers import words as words_of  # the words the matcher reads
    own = [i for i, s in enumerate(sentences) if s.subconcept == 0]
    words = [frozenset(words_of(s.text)) for s in sentences]
    for k, s in enumerate(sentences):
        others = [i for i in own if sentences[i].channel != s.channel]
        differ = [i for i in others if sentences[i].text != s.text]
        apart = [i for i in differ if not (words[i] <= words[k] or words[k] <= words[i])]
        pool = apart or differ or others
        s.control = int(rng.choice(pool)) if pool else -1


def score_sentences(inputs: RunInputs, groups: dict, keep: list[str], describe, match,
                    seed: int, also_keep: Sequence[str] = ()
                    ) -> tuple[dict[str, list[Sentence]], dict[str, np.ndarray]]:
    """Every sentence to verify, with its control, and the matcher's scores of each on the usable
    images → (layer → sentences, layer → images × sentences).

    ``describe`` (None when no neuron is a candidate for sub-concepts) splits the candidates into
    sub-concepts (filling ``groups``) and starts the describer on their mosaics: it returns a
    ``common.describers.Describing``, or None when no neuron splits. It is called once the
    matcher has started measuring the images, so that both run while the neurons' own sentences
    are scored; the window features of the candidates' layers (``keep``) are kept, so that the
    sub-concepts' sentences are then scored without decoding the images again. When those would
    not fit in memory, the describer is run and waited for first, and every sentence is scored in
    one pass. If scoring fails before the describer is done, it is stopped: no process is left
    behind.
    Each distinct sentence of a layer is scored once (controls are other neurons' sentences).
    The window features of the layers of ``also_keep`` (09's refinement scores more sentences of
    every layer) are kept too, smallest first, as far as they fit beside ``keep``'s.
    """
    geometry = {layer: (inputs.tops[layer].rf, (int(inputs.tops[layer].fmap[1]),
                                                int(inputs.tops[layer].fmap[2])))
                for layer in inputs.layers}
    usable_ids = np.flatnonzero(inputs.usable)
    if match.keeps(keep, len(usable_ids), inputs.input_size, geometry):
        size = {layer: int(np.prod(geometry[layer][1])) for layer in also_keep}
        for layer in sorted(set(also_keep) - set(keep), key=size.get):
            if match.keeps([*keep, layer], len(usable_ids), inputs.input_size, geometry):
                keep = [*keep, layer]
    own = {layer: sorted({r.description for (lay, _), r in inputs.descriptions.items()
                          if lay == layer and r.ok})
           for layer in inputs.layers}
    sub_text = None
    describing = None  # the background describer, once ``describe`` has started it
    try:
        if describe is not None and not match.keeps(keep, len(usable_ids), inputs.input_size,
                                                    geometry):
            describing = describe()
            sub_text = describing.result() if describing is not None else {}
            for layer in inputs.layers:
                own[layer] = sorted(set(own[layer]) | {
                    text for (lay, _), text in sub_text.items()
                    if lay.rsplit("#", 1)[0] == layer and text})
        with tqdm(total=len(usable_ids), desc="09 verify", unit="image", disable=None) as bar:
            def progress(items):
                """Advance the bar per image."""
                for item in items:
                    yield item
                    bar.update()

            def meanwhile():
                """Split into sub-concepts and start the describer on them while the images are
                measured."""
                nonlocal describing
                if describe is not None and sub_text is None:
                    describing = describe()
            scored = match.score(own, [inputs.image_paths[i] for i in usable_ids],
                                 inputs.input_size, geometry, progress,
                                 keep=keep if sub_text is None else (), meanwhile=meanwhile)
        if sub_text is None:
            sub_text = describing.result() if describing is not None else {}
    finally:
        if describing is not None:
            describing.stop()  # a no-op once it has finished
    column = {layer: {text: scored[layer][:, j] for j, text in enumerate(texts)}
              for layer, texts in own.items()}

    sentences: dict[str, list[Sentence]] = {layer: [] for layer in inputs.layers}
    for layer in inputs.layers:
        top = inputs.tops[layer]
        for channel in range(top.channels):
            row = inputs.descriptions.get((layer, channel))
            m = inputs.mosaics.get((layer, channel))
            shown = top.image_ids[channel, :m.n_tiles if m else 0]
            if row is not None and row.ok:
                sentences[layer].append(Sentence(layer, channel, 0, row.description, shown))
            for s in range(int(groups[(layer, channel)].max()) + 1 if (layer, channel) in groups
                           else 0):
                text = sub_text.get((f"{layer}#{s + 1}", channel), "")
                ranks = np.flatnonzero(groups[(layer, channel)] == s)
                sentences[layer].append(Sentence(layer, channel, s + 1, text,
                                                 top.image_ids[channel, ranks]))
    for layer in inputs.layers:  # one stream per layer: a layer's controls do not depend on others
        pick_controls(sentences[layer], np.random.default_rng([seed, zlib.crc32(layer.encode())]))
    more = {layer: sorted({s.text for s in sents if s.text} - set(own[layer]))
            for layer, sents in sentences.items()}
    more = {layer: texts for layer, texts in more.items() if texts}
    if more:
        for layer, scores in match.score_more(more).items():
            column[layer].update({text: scores[:, j] for j, text in enumerate(more[layer])})
    blank = np.zeros(len(usable_ids))  # a sentence without words is never verified
    matrix = {layer: np.stack([column[layer][s.text] if s.text else blank for s in sents], axis=1)
              if sents else np.zeros((len(usable_ids), 0))
              for layer, sents in sentences.items()}
    return sentences, matrix


def measure(scores: np.ndarray, control: np.ndarray | None, activation: np.ndarray,
            held_out: np.ndarray, scale: float, alpha: float, bootstrap: int,
            rng: np.random.Generator) -> tuple[dict, dict | None, dict]:
    """One sentence measured on the images of ``held_out`` (held out from its mosaic, in the test
    half): ``verify`` of the sentence and of its control (None without one), and the margin of
    the first over the second with its paired bootstrap interval over ``bootstrap`` resamples
    (``margin``, ``low``, ``high``; NaN without resamples), the Activation Rate (``ar``) and
    DnR's semantic consistency (``consistency``, weight ``alpha``, activations divided by
    ``scale``).

    The seam for ranking candidate sentences: called with the selection half instead, it gives
    the same numbers there."""
    from common.scores import activation_rate, bootstrap_margin, semantic_consistency
    mine, keep, positive = verify_masks(scores, activation, held_out)
    ctrl = verify(control, activation, held_out) if control is not None else None
    extra = {"margin": float("nan"), "low": float("nan"), "high": float("nan"),
             "ar": float("nan"), "consistency": float("nan")}
    if positive is not None:
        extra["ar"] = activation_rate(positive, scores[keep])
        extra["consistency"] = semantic_consistency(activation[keep], scores[keep], scale, alpha)
        if control is not None and bootstrap > 0:
            both = keep & np.isfinite(control)
            extra["margin"], extra["low"], extra["high"] = bootstrap_margin(
                scores[both], control[both], activation[both], bootstrap, rng)
    return mine, ctrl, extra


def check_layer(sentences: list[Sentence], matrix: np.ndarray, stats: np.ndarray,
                usable_ids: np.ndarray, test: np.ndarray, alpha: float, bootstrap: int,
                seed: list[int]) -> dict[tuple[int, int], tuple]:
    """Verify every sentence of one layer on the test half (``test``, over ``usable_ids``) minus
    its own mosaic's images: (channel, subconcept) → (sentence, its verification, its control's,
    ``measure``'s margin, AR and consistency); the verifications are None and the rest empty for
    a sentence without words. ``matrix`` is ``score_sentences``'s for the layer, ``stats`` the
    layer's per-image maxima of the usable images (rows as ``usable_ids``); each sentence's
    bootstrap draws from its own stream, ``seed`` + (channel, subconcept)."""
    scale = float(np.nanmax(stats)) if stats.size else float("nan")
    checks = {}
    for i, s in enumerate(sentences):
        held_out = ~np.isin(usable_ids, s.shown) & test
        measured = measure(
            matrix[:, i], matrix[:, s.control] if s.control >= 0 else None, stats[:, s.channel],
            held_out, scale, alpha, bootstrap,
            np.random.default_rng([*seed, s.channel, s.subconcept])) if s.text else (None, None, {})
        checks[(s.channel, s.subconcept)] = (s, *measured)
    return checks
