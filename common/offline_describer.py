"""The offline describer: a sentence from what can be measured in a neuron's crops and what its
top images are, with no vision-language model.

Level position decides the content: early layers get their crops' appearance (colours, contrast,
orientation, stripes: common/appearance.py); deep layers what their top images are; middle layers
both, the latter only when one kind clearly leads. What the top images are comes from the analysed
model itself — the labels of its top images where they are labelled, else its own predictions,
in its own class names, its crops classified by it (``classes_phrase``, ``model_classify``) — or,
for an ImageNet model or when asked, from the shipped reference classifier (EfficientNet-Lite0),
grouped into broader ImageNet kinds (``objects_phrase``, ``reference_classify``).
"""
from __future__ import annotations

import functools
import hashlib
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from common.appearance import appearance_phrase, measure_tiles
from common.mosaics import cut_tiles, load_mosaic

CLASSIFY_PX = 112            # side at which smaller crops are classified (tiles are ~64 px anyway)
OFFLINE_LABEL = "measured colour, contrast, orientation, texture + efficientnet_lite0 labels"
OWN_LABEL = "measured colour, contrast, orientation, texture + labels and predictions of {model}"
ASKED_LABEL = OFFLINE_LABEL + " (ImageNet reference classifier, asked for with --namer reference)"


# ---------------------------------------------------------------------------------------------
# Offline backend: what the reference classifier sees, grouped into kinds

# Broader kinds over ImageNet-1k class indices (torchvision order), following WordNet's groups.
KINDS = [
    ((0, 6), "fish"), ((7, 24), "birds"), ((25, 32), "amphibians"), ((33, 37), "turtles"),
    ((38, 50), "lizards and crocodiles"), ((51, 51), "dinosaurs"), ((52, 68), "snakes"),
    ((69, 79), "spiders and other arthropods"), ((80, 100), "birds"), ((101, 106), "mammals"),
    ((107, 117), "sea creatures and molluscs"), ((118, 126), "crabs and lobsters"),
    ((127, 146), "birds"), ((147, 150), "marine mammals"), ((151, 268), "dogs"),
    ((269, 280), "wolves and foxes"), ((281, 293), "cats"), ((294, 297), "bears"),
    ((298, 299), "mammals"), ((300, 326), "insects"), ((327, 329), "sea creatures and molluscs"),
    ((330, 338), "rodents and rabbits"), ((339, 355), "hoofed mammals"), ((356, 364), "mammals"),
    ((365, 384), "primates"), ((385, 386), "elephants"), ((387, 388), "pandas"), ((389, 397), "fish"),
    ((924, 969), "food"), ((970, 980), "landscapes"), ((981, 983), "people"),
    ((984, 990), "plants"), ((991, 997), "fungi"), ((998, 998), "plants"),
]
VEHICLES = {407, 436, 444, 468, 511, 555, 565, 569, 573, 575, 603, 609, 612, 627, 654, 656, 661,
            665, 670, 671, 675, 705, 717, 734, 751, 757, 779, 802, 817, 829, 847, 864, 867, 870,
            874, 880, 466, 547, 820}
BOATS = {403, 472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 914}
AIRCRAFT = {404, 405, 895, 908}
OBJECTS = "man-made objects"


@functools.lru_cache(maxsize=None)
def kind_of(index: int) -> str:
    """Broader kind of ImageNet class ``index`` (``man-made objects`` for the remaining artefacts)."""
    for (lo, hi), name in KINDS:
        if lo <= index <= hi:
            return name
    if index in VEHICLES:
        return "vehicles"
    if index in BOATS:
        return "boats and ships"
    if index in AIRCRAFT:
        return "aircraft"
    return OBJECTS


def _plural(word: str) -> str:
    """English plural of a lower-case head noun (regular rules; good enough for class heads)."""
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def objects_phrase(top5: Sequence[tuple[Sequence[int], Sequence[float]]],
                   names: Sequence[str]) -> tuple[str, float]:
    """Phrase naming the kinds (and, if one dominates, the sub-kind) of the classified images.

    ``top5`` holds per image the classifier's five class indices and probabilities. Returns the
    phrase and the share of images behind its main claim (0 when nothing clear was seen).
    """
    if not top5:
        return "", 0.0
    kind_share: dict[str, float] = {}
    top1 = []
    for idx, prob in top5:
        mass = float(sum(prob)) or 1.0
        for i, p in zip(idx, prob):
            kind_share[kind_of(int(i))] = kind_share.get(kind_of(int(i)), 0.0) + p / mass / len(top5)
        top1.append((int(idx[0]), float(prob[0])))
    ranked = sorted(kind_share.items(), key=lambda kv: -kv[1])
    main, share = ranked[0]

    def detail(kind: str) -> str:
        """Which classes of ``kind`` dominate among the images whose top class is of that kind."""
        members = [names[i] for i, _ in top1 if kind_of(i) == kind]
        if len(members) < 2:
            return members[0] if kind == OBJECTS and members else ""
        heads: dict[str, int] = {}
        classes: dict[str, int] = {}
        for name in members:
            heads[name.split()[-1].lower()] = heads.get(name.split()[-1].lower(), 0) + 1
            classes[name] = classes.get(name, 0) + 1
        cls, n_cls = max(classes.items(), key=lambda kv: kv[1])
        head, n_head = max(heads.items(), key=lambda kv: kv[1])
        if n_cls / len(members) >= 0.5:
            return cls
        if n_head / len(members) >= 0.5 and n_head >= 2 and _plural(head) != kind:
            return _plural(head)
        common = sorted(classes.items(), key=lambda kv: -kv[1])[:3]
        return ", ".join(c for c, _ in common) if kind == OBJECTS else ""

    def named(kind: str) -> str:
        """The kind with its detail, e.g. ``dogs, mostly terriers``."""
        sub = detail(kind)
        if kind == OBJECTS:
            return f"objects such as {sub}" if sub else "various man-made objects"
        return f"{kind}, mostly {sub}" if sub else kind

    if share >= 0.5:
        text = named(main)
        if len(ranked) > 1 and ranked[1][1] >= 0.2:
            text += f"; also {ranked[1][0] if ranked[1][0] != OBJECTS else 'man-made objects'}"
    else:
        kinds = [k for k, s in ranked[:3] if s >= 0.1] or [main]
        text = "a mix of " + (kinds[0] if len(kinds) == 1 else
                              ", ".join(kinds[:-1]) + " and " + kinds[-1])
    confidence = float(np.mean([p for _, p in top1]))
    if confidence < 0.25:
        text += " (low classifier confidence)"
    return text, share


def classes_phrase(top5: Sequence[tuple[Sequence[int], Sequence[float]]],
                   names: Sequence[str]) -> tuple[str, float]:
    """Phrase naming the classes of the top images in the analysed model's own class names,
    with their shares, e.g. ``mostly Sneaker (58%); also Ankle boot (32%)``.

    ``top5`` holds per image a label or the model's top classes (first = the class counted).
    Returns the phrase and the share of the leading class (0 when there is none).
    """
    counts: dict[int, int] = {}
    for idx, _prob in top5:
        if len(idx):
            counts[int(idx[0])] = counts.get(int(idx[0]), 0) + 1
    if not counts:
        return "", 0.0
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))

    def name(i: int) -> str:
        """The class's name (its index where the model's outputs have no names)."""
        return names[i] if 0 <= i < len(names) else f"class {i}"

    def named(i: int, n: int) -> str:
        """A class name with its share of the images."""
        return f"{name(i)} ({100 * n / total:.0f}%)"
    main_share = ranked[0][1] / total
    others = [named(i, n) for i, n in ranked[1:] if n / total >= 0.1][:2]
    if main_share == 1:
        return f"all {name(ranked[0][0])}", 1.0
    if main_share >= 0.5:
        text = "mostly " + named(*ranked[0])
        return (text + ("; also " + " and ".join(others) if others else "")), main_share
    leading = [named(i, n) for i, n in ranked[:3] if n / total >= 0.1] or [named(*ranked[0])]
    text = "a mix of " + (leading[0] if len(leading) == 1 else
                          ", ".join(leading[:-1]) + " and " + leading[-1])
    return text, main_share


class OfflineDescriber:
    """Describes neurons from measurements of their crops and the reference classifier's labels.

    Level position decides the content: the first third of the levels gets appearance only, the
    last third classifier labels only, the middle both (labels only when one kind clearly leads).
    """

    backend = "offline"
    batch_size = 64

    def __init__(self, n_levels: int, predictions: dict[int, tuple[list[int], list[float]]],
                 class_names: Sequence[str], classify: Callable | None = None,
                 classify_tiles: int = 8, device: str = "auto",
                 load_classifier: Callable | None = None, phrase: Callable = objects_phrase,
                 deep_from_images: bool = False, model_label: str = OFFLINE_LABEL):
        """``predictions``: image id → top-5 (indices, probs), reused for whole-image receptive
        fields; ``classify``: fn(list of PIL crops) → list of top-5, else built on first use by
        ``load_classifier()`` (default: the reference classifier); ``phrase``: fn(top-5s, names)
        → (text, share); ``deep_from_images``: deep levels name the top images from
        ``predictions`` alone, whatever their receptive field."""
        self.n_levels = n_levels
        self.predictions = predictions
        self.class_names = list(class_names)
        self._classify = classify
        self._load_classifier = load_classifier or (lambda: reference_classify(device, CLASSIFY_PX))
        self.phrase = phrase
        self.deep_from_images = deep_from_images
        self.classify_tiles = classify_tiles
        self.device = device
        self._cache: dict[bytes, tuple[list[int], list[float]]] = {}
        self.model_label = model_label
        self.n_classified = 0  # crops sent to the classifier (the expensive part)

    def _classify_crops(self, tiles: Sequence[np.ndarray]) -> list:
        """Reference top-5 of each crop, computing only crops not seen before (cache by bytes)."""
        if not tiles:
            return []
        keys = [hashlib.blake2b(t.tobytes(), digest_size=16).digest() for t in tiles]
        todo = {k: t for k, t in zip(keys, tiles) if k not in self._cache}
        if todo:
            if self._classify is None:
                self._classify = self._load_classifier()
            results = self._classify([Image.fromarray(t) for t in todo.values()])
            self.n_classified += len(todo)
            self._cache.update(zip(todo.keys(), results))
        return [self._cache[k] for k in keys]

    def _split(self, neuron, tiles: Sequence[np.ndarray], deep: bool) -> tuple[list, list]:
        """(01's top-5 of the top images whose crop is the whole image — of every top image for
        a deep level when ``deep_from_images`` — and the other crops to classify, only the first
        ``classify_tiles`` of those, to bound the cost)."""
        if deep and self.deep_from_images:
            return [self.predictions[int(i)] for i in neuron.top_ids[:len(tiles)]
                    if int(i) in self.predictions], []
        labels, crops = [], []
        for rank, tile in enumerate(tiles):
            image_id = int(neuron.top_ids[rank]) if rank < len(neuron.top_ids) else -1
            whole = rank < len(neuron.whole) and bool(neuron.whole[rank])
            if whole and image_id in self.predictions:
                labels.append(self.predictions[image_id])
            elif len(crops) < self.classify_tiles:
                crops.append(tile)
        return labels, crops

    def describe(self, neurons: Sequence) -> list[tuple[str | None, str]]:
        """(text, error) per neuron (``common.describers.Neuron``). The crops of the whole batch
        are classified together."""
        prepared = []
        for neuron in neurons:
            tiles = cut_tiles(load_mosaic(neuron.mosaic), neuron.grid, neuron.tile_px,
                              neuron.n_tiles)
            position = (neuron.level - 1) / max(1, self.n_levels - 1)
            look = appearance_phrase(measure_tiles(tiles)) if tiles and position < 0.7 else ""
            labels, crops = self._split(neuron, tiles, position >= 0.7) if position > 0.3 \
                else ([], [])
            prepared.append((bool(tiles), position, look, labels, crops))
        self._classify_crops([c for p in prepared for c in p[4]])  # one batched pass, cached
        out = []
        for has_tiles, position, look, labels, crops in prepared:
            if not has_tiles:
                out.append((None, "mosaic has no tiles"))
                continue
            seen, share = ("", 0.0)
            if position > 0.3:
                seen, share = self.phrase(labels + self._classify_crops(crops), self.class_names)
            if position < 0.7 and (share < 0.5 or seen.startswith(("objects", "various"))):
                seen = ""  # middle layers: only a clear majority of one specific kind is stated
            verb = "classified as " if self.phrase is objects_phrase else ""
            if look and seen:
                text = f"{look[0].upper()}{look[1:]}; top images {verb}{seen}."
            elif seen:
                text = f"Top images {verb}{seen}."
            elif look:
                text = f"{look[0].upper()}{look[1:]}."
            else:
                text = None
            out.append((text, "" if text else "nothing measurable in the mosaic"))
        return out


def reference_classify(device: str = "auto", size: int | None = None) -> Callable:
    """fn(list of PIL images) → list of reference-classifier top-5 (indices, probs), batched."""
    import torch
    from torchvision.transforms.functional import normalize, pil_to_tensor
    from common.models import load_reference_classifier
    bundle = load_reference_classifier(device=device)
    side = size or bundle.input_size

    def classify(images):
        """Top-5 classes of each image at ``side`` pixels."""
        results = []
        with torch.inference_mode():
            for start in range(0, len(images), 32):
                batch = torch.stack([pil_to_tensor(im.convert("RGB").resize((side, side)))
                                     .float().div_(255) for im in images[start:start + 32]])
                probs = bundle.model(normalize(batch, bundle.mean, bundle.std)
                                     .to(bundle.device)).softmax(1)
                p, i = probs.topk(5, dim=1)
                results += [(ii.tolist(), pp.tolist()) for ii, pp in zip(i.cpu(), p.cpu())]
        return results
    return classify


def model_classify(meta01: dict, model: str | None, weights: str | None, unsafe_pickle: bool,
                   device: str = "auto") -> Callable:
    """fn(list of PIL crops) → top-5 (indices, probs) of the analysed model, reloaded as 01 ran it
    (with its input size, mean and std) — its files only when the user names them again
    (``model``, ``weights``) and a pickle only with this stage's own ``unsafe_pickle``."""
    import torch
    from common.images import network_input, to_tensor
    from common.models import reload_model
    bundle = reload_model(meta01, model, weights, unsafe_pickle, device)

    def classify(images):
        """Top classes of each crop, prepared as 01 prepared whole images."""
        results = []
        with torch.inference_mode():
            for start in range(0, len(images), 32):
                batch = torch.stack([to_tensor(network_input(im, bundle.input_size), bundle.mean,
                                               bundle.std) for im in images[start:start + 32]])
                logits = bundle.model(batch.to(bundle.device)).float()
                if logits.ndim != 2:  # not a classifier: nothing to name the crops with
                    results += [([], [])] * len(batch)
                    continue
                p, i = logits.softmax(1).topk(min(5, logits.shape[1]), dim=1)
                results += [(ii.tolist(), pp.tolist()) for ii, pp in zip(i.cpu(), p.cpu())]
        return results
    return classify
