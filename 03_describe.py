"""Stage 03 — describe every neuron's mosaic in words, with a prompt fitted to the layer's depth.

Reads 02_mosaics.csv (+ the mosaic PNGs), 01_activations.npz and 01_predictions.csv.
Writes 03_descriptions.csv (layer, channel, level, description, backend, model, status, reason)
and 03_describe.meta.json.

Backends (--backend):
  offline  deterministic text from what can be measured (default; no model download needed):
           named colours, contrast, orientation and stripes of the crops for early layers; what
           the neuron's top images are for deep layers; both for the middle layers. "What they
           are" comes from the analysed model itself: the labels of its top images where they
           are labelled, else its own predictions, in its own class names (crops smaller than
           the image: the analysed model classifies them). For an ImageNet model, and with
           --namer reference for any model, the reference classifier (EfficientNet-Lite0) names
           them instead, grouped into broader ImageNet kinds.
  hf       any Hugging Face image-text-to-text model (local folder or hub id), batched.
  openai   any OpenAI-compatible chat-completions server with image input (vLLM, Ollama, …);
           the API key is read from the environment variable named by --api-key-env.

Progress is appended to a journal beside the output (03_descriptions.part-<i>-of-<N>.jsonl),
one line per answer as it arrives, so an interrupted run loses nothing: a rerun skips neurons
already described with the same inputs, backend, model and prompt, and retries the failed ones
(a line torn by a kill or a full disk is dropped, logged, and its neuron described again). While
a VLM backend leaves neurons failed, the CSV is written for the later stages but the stage stays
out of date for make (its meta gets an old timestamp), so the next `make all` retries them.
With --shard i/N each machine describes its share; the run that completes the set (or
--merge) writes 03_descriptions.csv.

Example:
  python 03_describe.py --mosaics data/demo/02_mosaics.csv \
      --activations data/demo/01_activations.npz --predictions data/demo/01_predictions.csv \
      --out data/demo/03_descriptions.csv --backend offline
"""
from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import io
import json
import logging
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from common import artefacts
from common.cli import (FULL, StageError, escaped, exit_on_stage_error, file_system_problem,
                        parse_shard, shard_slice, stage_parser, start_stage)
from common.appearance import PALETTE, colour_codes
from common.io import DiskFull, plain_text, sweep_temporaries, write_csv
from common.mosaics import cut_tiles, load_mosaic
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta

log = logging.getLogger("neuron-atlas.03_describe")

STAGE = "03_describe"
FIELDS = ["layer", "channel", "level", "description", "backend", "model", "status", "reason"]
DEFAULT_PROMPTS = Path(__file__).resolve().parent / "common" / "prompts.yaml"
DEFAULT_HF_MODEL = "llava-hf/llava-1.5-7b-hf"  # the thesis's describer, for a GPU workstation
BACKGROUND = (128, 128, 128)  # 02's fill for empty tiles and fields past the image: not content
MAX_ANSWER_CHARS = 400        # longer answers are cut at a sentence end
WHOLE_AREA = 0.6             # a crop covering this share of the input counts as the whole image
CLASSIFY_PX = 112            # side at which smaller crops are classified (tiles are ~64 px anyway)
OFFLINE_LABEL = "measured colour, contrast, orientation, texture + efficientnet_lite0 labels"
OWN_LABEL = "measured colour, contrast, orientation, texture + labels and predictions of {model}"
ASKED_LABEL = OFFLINE_LABEL + " (ImageNet reference classifier, asked for with --namer reference)"

# ---------------------------------------------------------------------------------------------
# Prompts and levels


def load_prompts(path: str | Path) -> dict:
    """Read a prompt file (YAML or JSON) and check it has a domain section and ≥ 1 level."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise StageError(f"prompt file {path} not found; pass --prompts (default {DEFAULT_PROMPTS})")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh) if path.suffix == ".json" else yaml.safe_load(fh)
    parts = ("role", "describe", "avoid", "answer")
    levels = (data or {}).get("levels") or []
    bad = [i + 1 for i, lv in enumerate(levels) if not all(isinstance(lv.get(p), str) for p in parts)]
    if not levels or bad or "domain" not in data:
        raise StageError(f"prompt file {path} needs a 'domain' section and a list 'levels' whose "
                         f"entries have {', '.join(parts)} (bad levels: {bad or 'none listed'})")
    return data


def build_prompt(prompts: dict, level: int, domain: str = "", keywords: str = "") -> str:
    """The prompt for ``level`` (1-based): role, domain context, what to describe and avoid, form."""
    spec = prompts["levels"][level - 1]
    dom = prompts["domain"]
    parts = [spec["role"], dom["context"].format(domain=domain or dom["default"]),
             spec["describe"], spec["avoid"], spec["answer"]]
    if keywords and spec.get("keywords", False):
        parts.append(dom["keywords"].format(keywords=keywords))
    return " ".join(" ".join(p.split()) for p in parts)


def parse_levels(text: str) -> dict[str, int]:
    """Parse ``layer=level,layer=level`` (levels 1-based) into a dict."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        layer, sep, level = item.rpartition("=")
        if not sep or not layer or not level.strip().isdigit():
            raise StageError(f"--levels expects layer=level pairs such as layer1=2, got {item!r}")
        out[layer.strip()] = int(level)
    return out


def assign_levels(layers: Sequence[str], n_levels: int, explicit: dict[str, int] | None = None
                  ) -> dict[str, int]:
    """Level of each layer: the explicit setting, else by relative depth among ``layers``.

    With as many layers as levels this is one level per layer; a single layer gets the middle
    level, since its relative depth is undefined.
    """
    explicit = explicit or {}
    wrong = {k: v for k, v in explicit.items() if not 1 <= v <= n_levels}
    if wrong:
        raise StageError(f"--levels {wrong}: levels run from 1 to {n_levels} in the prompt file")
    levels = {}
    for j, layer in enumerate(layers):
        if layer in explicit:
            levels[layer] = explicit[layer]
        elif len(layers) == 1:
            levels[layer] = (n_levels + 1) // 2
        else:
            levels[layer] = 1 + round(j * (n_levels - 1) / (len(layers) - 1))
    return levels


# ---------------------------------------------------------------------------------------------
# Post-processing of model answers

_ROLE_PREFIX = re.compile(r"^\s*(?:\[/INST\]|<\|assistant\|>|<\|im_start\|>assistant|"
                          r"(?:assistant|answer|description|response|gpt)\s*:)\s*", re.IGNORECASE)
_REFUSAL = re.compile(r"^\s*(?:i\s*(?:am|'m)\s+(?:sorry|unable|not able)|i\s+can(?:no|')t|"
                      r"sorry\b|as an ai\b|unable to)", re.IGNORECASE)


def clean_answer(raw: str | None) -> tuple[str, str]:
    """Strip control characters, role prefixes, quotes and extra whitespace → (text, reason);
    reason set when unusable."""
    if raw is None:
        return "", "no answer"
    text = plain_text(raw)  # no escape codes or bidi tricks reach a CSV, page or terminal
    for _ in range(3):  # prefixes can stack, e.g. "ASSISTANT: Answer: ..."
        text = _ROLE_PREFIX.sub("", text, count=1).strip()
    text = text.strip("\"'`“”‘’ ").strip()
    if len(text) > MAX_ANSWER_CHARS:
        cut = text[:MAX_ANSWER_CHARS]
        text = cut[:cut.rfind(". ") + 1] if ". " in cut else cut
    if not re.search(r"[A-Za-z]", text):
        return "", "empty answer"
    if _REFUSAL.match(text):
        return "", f"refused: {text[:80]}"
    return text, ""


# ---------------------------------------------------------------------------------------------
# What each backend gets


class Neuron(NamedTuple):
    """One neuron to describe: where its mosaic is and the prompt for its level."""

    layer: str
    channel: int
    level: int
    mosaic: Path
    grid: int
    tile_px: int
    n_tiles: int
    prompt: str
    top_ids: np.ndarray = np.zeros(0, np.int64)  # read-only default: never modified in place
    whole: np.ndarray = np.zeros(0, bool)  # per top image: its receptive field spans the input


# ---------------------------------------------------------------------------------------------
# Offline backend: measured appearance


def _centre_weight(side: int) -> np.ndarray:
    """Gaussian weight over a tile: a receptive field's centre drives the unit most."""
    ax = np.arange(side) - (side - 1) / 2
    w = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * (side / 3.0) ** 2))
    return w / w.sum()


def measure_tiles(tiles: Sequence[np.ndarray]) -> dict:
    """Colour shares, contrast, dominant orientation, its consistency, and stripe frequency.

    Orientation comes from the structure tensor of each tile's luminance (gradient outer
    products, centre-weighted); the tiles' doubled angles are averaged, weighted by gradient
    energy, so that opposite gradients agree. Stripes are told from single edges by the
    frequency of the strongest non-constant Fourier component. All tiles are processed at once.
    Flat grey (02's padding past the image border, empty tiles) is left out, and so is the border
    between it and the image, which is no feature of the image.
    """
    from scipy.ndimage import correlate1d, maximum_filter
    empty = {"colours": {}, "contrast": 0.0, "agreement": 0.0, "coherence": 0.0,
             "orientation_deg": 0.0, "cycles": 0.0, "periodic": 0.0, "n_tiles": 0}
    side = min(min(t.shape[:2]) for t in tiles) if len(tiles) else 0
    if side < 4:
        return empty
    stack = np.stack([t[:side, :side] for t in tiles])
    valid = ~np.all(stack == BACKGROUND, axis=-1)
    stack, valid = stack[valid.mean((1, 2)) >= 0.2], valid[valid.mean((1, 2)) >= 0.2]
    if not len(stack):
        return empty
    w = _centre_weight(side)
    codes = colour_codes(stack)
    counts = np.bincount(codes[valid], weights=np.broadcast_to(w, codes.shape)[valid],
                         minlength=len(PALETTE))
    shares = {PALETTE[i]: float(c / counts.sum()) for i, c in enumerate(counts) if c > 0}
    shares = dict(sorted(shares.items(), key=lambda kv: -kv[1]))
    lum = stack.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
    w_image = w * valid
    w_image /= w_image.sum((1, 2), keepdims=True)
    mean = (w_image * lum).sum((1, 2), keepdims=True)
    contrasts = np.sqrt((w_image * (lum - mean) ** 2).sum((1, 2)))
    lum = np.where(valid, lum, mean)  # grey padding → the tile's mean: no step at its border
    # Sobel along one image axis, smoothing along the other (never across tiles); gradients that
    # touch padding are dropped.
    gx = correlate1d(correlate1d(lum, [-1, 0, 1], axis=2), [1, 2, 1], axis=1) / 8
    gy = correlate1d(correlate1d(lum, [-1, 0, 1], axis=1), [1, 2, 1], axis=2) / 8
    w_grad = w * ~maximum_filter(~valid, size=(1, 3, 3))
    jxx, jyy, jxy = ((w_grad * gx * gx).sum((1, 2)), (w_grad * gy * gy).sum((1, 2)),
                     (w_grad * gx * gy).sum((1, 2)))
    energy = jxx + jyy
    live = energy >= 1e-5
    if live.any():
        coherence = np.hypot(jxx - jyy, 2 * jxy)[live] / energy[live]
        doubled = np.arctan2(2 * jxy, jxx - jyy)[live]
        vec = np.sum(energy[live] * np.exp(1j * doubled)) / energy[live].sum()
        spec = np.abs(np.fft.fft2((lum - lum.mean((1, 2), keepdims=True))[live] *
                                  np.sqrt(w * side * side), axes=(1, 2))) ** 2
        fy, fx = np.meshgrid(np.fft.fftfreq(side) * side, np.fft.fftfreq(side) * side,
                             indexing="ij")
        radius = np.hypot(fy, fx)
        spec[:, radius < 1] = 0
        flat = spec.reshape(len(spec), -1)
        peak_r = radius.reshape(-1)[np.argmax(flat, axis=1)]
        near = np.abs(radius[None] - peak_r[:, None, None]) <= 1
        periodic = (spec * near).sum((1, 2)) / np.maximum(spec.sum((1, 2)), 1e-12)
        agreement = float(np.abs(vec))
        stripe_deg = float((np.degrees(np.angle(vec)) / 2 + 90) % 180)  # edges cross gradients
        coh, cyc, per = (float(np.median(coherence)), float(np.median(peak_r)),
                         float(np.median(periodic)))
    else:
        agreement = stripe_deg = coh = cyc = per = 0.0
    return {"colours": shares, "contrast": float(np.median(contrasts)), "agreement": agreement,
            "coherence": coh, "orientation_deg": stripe_deg, "cycles": cyc, "periodic": per,
            "n_tiles": int(len(stack))}


def orientation_word(deg: float) -> str:
    """horizontal / vertical / diagonal for a line angle in degrees (0 = horizontal)."""
    deg = deg % 180
    if deg < 22.5 or deg >= 157.5:
        return "horizontal"
    if 67.5 <= deg < 112.5:
        return "vertical"
    return "diagonal"


def appearance_phrase(m: dict) -> str:
    """A short phrase saying only what ``measure_tiles`` found."""
    if m["n_tiles"] == 0:
        return ""
    shares = m["colours"]
    # Near-equal shares are listed in palette order, so "black and white" reads the same each time.
    ranked = sorted(shares, key=lambda c: (-round(shares[c] * 10), PALETTE.index(c)))
    main = [c for c in ranked if shares[c] >= 0.15][:3]
    if not main or sum(shares[c] for c in ranked[:3]) < 0.6:
        colours = "mixed colours"
    elif len(main) == 1:
        colours = main[0]
    else:
        colours = ", ".join(main[:-1]) + " and " + main[-1]
    oriented = m["agreement"] >= 0.5 and m["coherence"] >= 0.35
    if m["contrast"] < 0.03:
        return f"uniform {colours} areas"
    elif oriented and m["cycles"] >= 2 and m["periodic"] >= 0.15:
        form = f"{orientation_word(m['orientation_deg'])} stripes"
    elif oriented:
        form = f"{orientation_word(m['orientation_deg'])} edges"
    elif m["periodic"] >= 0.25 and m["cycles"] >= 2:
        form = "a repeating texture"
    else:
        form = "irregular texture"
    text = f"{form} in mixed colours" if colours == "mixed colours" else f"{colours} {form}"
    if m["contrast"] >= 0.25:
        text += ", high contrast"
    elif m["contrast"] < 0.08:
        text += ", low contrast"
    return text


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

    def _split(self, neuron: Neuron, tiles: Sequence[np.ndarray], deep: bool) -> tuple[list, list]:
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

    def describe(self, neurons: Sequence[Neuron]) -> list[tuple[str | None, str]]:
        """(text, error) per neuron. The crops of the whole batch are classified together."""
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


# ---------------------------------------------------------------------------------------------
# Hugging Face backend


class HFDescriber:
    """A Hugging Face image-text-to-text model: chat template, batched generation, decoding."""

    backend = "hf"

    def __init__(self, model_id: str, device: str = "auto", batch_size: int = 64,
                 temperature: float = 0.8, top_p: float = 0.95, max_new_tokens: int = 57,
                 seed: int = 0):
        """Load ``model_id`` (folder or hub id): bf16 (else fp16) on a GPU, fp32 on the CPU."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from common.models import pick_device
        self.batch_size = batch_size
        self.gen = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            self.gen.update(temperature=temperature, top_p=top_p)
        dev = pick_device(device)
        dtype = torch.float32
        if dev.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        try:
            processor = AutoProcessor.from_pretrained(model_id)
            model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype).to(dev)
        except (OSError, ValueError) as err:
            raise StageError(
                f"cannot load vision-language model {model_id!r} ({err}). Give a local folder "
                f"with its weights (--model path/to/model, Make VLM=…), or download "
                f"it on a connected machine first (`hf download {model_id}`); progress so far "
                f"is kept") from err
        self.model = model.eval()
        self.processor = processor
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"  # generation continues from the right end of each row
        self.model_label = model_id
        torch.manual_seed(seed)

    def prompt_text(self, prompt: str) -> str:
        """The chat-templated text for one image and one user prompt."""
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)

    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        """Generate one answer per (image, prompt) in a single batch; decode the new tokens only."""
        import torch
        texts = [self.prompt_text(p) for p in prompts]
        inputs = self.processor(images=list(images), text=texts, return_tensors="pt",
                                padding=True).to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.gen)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new, skip_special_tokens=True)

    def describe(self, neurons: Sequence[Neuron]) -> list[tuple[str | None, str]]:
        """(raw answer, error) per neuron; a failing batch fails its neurons, not the run."""
        images = [load_mosaic(n.mosaic) for n in neurons]
        try:
            return [(a, "") for a in self.generate(images, [n.prompt for n in neurons])]
        except RuntimeError as err:  # e.g. CUDA out of memory: record, keep going
            return [(None, f"generation failed: {err}")] * len(neurons)


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible backend


class ServerUnreachable(Exception):
    """The server refused the connection (as opposed to a bad or missing answer)."""


def _refused(err: BaseException) -> bool:
    """True when ``err`` (an openai.APIConnectionError) comes from a refused connection."""
    while err is not None:
        if isinstance(err, ConnectionRefusedError) or type(err).__name__ == "ConnectError":
            return True
        err = err.__cause__ or err.__context__
    return False


def _root_cause(err: BaseException) -> str:
    """The innermost exception of a chain, as ``Type: message`` (what actually went wrong)."""
    while err.__cause__ or err.__context__:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}"[:160]


class OpenAIDescriber:
    """Chat-completions requests through the ``openai`` client, the mosaic as a data URL,
    ``concurrency`` at a time. The client retries timeouts, dropped connections, 408/409/429 and
    5xx with exponential back-off; what still fails is a failed neuron with its reason."""

    backend = "openai"

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 60.0, retries: int = 3,
                 temperature: float = 0.8, top_p: float = 0.95, max_new_tokens: int = 57,
                 seed: int = 0):
        """Settings of the server; the key is read from ``api_key_env`` here and kept in memory."""
        import openai
        self.base_url = base_url
        self.model_name = model
        self.model_label = model
        self.batch_size = max(1, concurrency) * 4
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        # Local servers (vLLM, Ollama) started without a key accept any; the client needs one.
        self.client = openai.OpenAI(api_key=os.environ.get(api_key_env) or "none",
                                    base_url=base_url, timeout=timeout, max_retries=retries)
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_new_tokens,
                         "seed": seed}

    def _messages(self, neuron: Neuron) -> list[dict]:
        """The user message: the prompt and the mosaic as a base64 PNG data URL."""
        buf = io.BytesIO()
        load_mosaic(neuron.mosaic).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        return [{"role": "user", "content": [{"type": "text", "text": neuron.prompt},
                                             {"type": "image_url", "image_url": {"url": url}}]}]

    def _one(self, neuron: Neuron) -> tuple[str | None, str]:
        """Describe one neuron → (raw answer, "") or (None, why it failed)."""
        import openai
        try:
            # The raw answer is parsed here, so that a body of the wrong kind is named as such.
            reply = self.client.chat.completions.with_raw_response.create(
                model=self.model_name, messages=self._messages(neuron), **self.sampling)
            body = reply.http_response.content
        except openai.APIStatusError as err:
            return None, f"HTTP {err.status_code}"
        except openai.APITimeoutError:
            return None, f"timeout: no answer within {self.timeout:g} s"
        except openai.APIConnectionError as err:
            if _refused(err):
                raise ServerUnreachable(_root_cause(err)) from err
            return None, f"connection error: {_root_cause(err)}"
        except (openai.OpenAIError, OSError, ValueError) as err:  # anything else on the wire
            return None, f"request failed: {_root_cause(err)}"
        start = escaped(body[:80].decode("utf-8", "replace"))
        try:
            answer = json.loads(body)
        except ValueError:
            return None, f"the server's answer is not JSON: {start}"
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None, f"the server's answer is not a chat completion (no choices[0].message." \
                         f"content): {start}"
        if isinstance(content, list):  # some servers return content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            return None, f"the server's answer holds no text (choices[0].message.content): {start}"
        return content, ""

    def describe_as_completed(self, neurons: Sequence[Neuron]):
        """Yield (index into ``neurons``, (raw answer, error)) as each answer arrives, so that
        the caller can journal it at once."""
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            futures = {pool.submit(self._one, n): i for i, n in enumerate(neurons)}
            for future in as_completed(futures):
                yield futures[future], future.result()
        except ServerUnreachable as err:
            raise StageError(
                f"cannot reach the server at {self.base_url} ({err}). Start it (e.g. `vllm serve "
                f"{self.model_name}`) or fix --base-url (Make BASE_URL=…); descriptions done so "
                f"far are kept and the next run continues from there") from err
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def describe(self, neurons: Sequence[Neuron]) -> list[tuple[str | None, str]]:
        """(raw answer, error) per neuron, in order."""
        out: list = [None] * len(neurons)
        for i, result in self.describe_as_completed(neurons):
            out[i] = result
        return out


# ---------------------------------------------------------------------------------------------
# Journal of progress


def journal_path(out: Path, shard: tuple[int, int]) -> Path:
    """The append-only progress file of one shard (the whole run is shard 0/1)."""
    return out.with_name(f"{out.stem}.part-{shard[0]}-of-{shard[1]}.jsonl")


class Journal:
    """A shard's journal opened for appending: one JSON line per answer, handed to the operating
    system as it arrives (a kill of the process loses none) and synced to disk per batch."""

    def __init__(self, path: Path):
        """Remember the file; nothing is opened yet."""
        self.path = path

    def __enter__(self) -> "Journal":
        """Drop a torn last line (a kill or a full disk mid-write), then open for appending."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "ab+", buffering=0)
        size = self.fh.seek(0, os.SEEK_END)
        if size and os.pread(self.fh.fileno(), 1, size - 1) != b"\n":
            keep = os.pread(self.fh.fileno(), size, 0).rfind(b"\n") + 1
            self.fh.truncate(keep)
            log.warning("%s ended in a torn record (%d bytes, from a kill or a full disk); it is "
                        "dropped and its neuron described again", self.path.name, size - keep)
        return self

    def add(self, record: dict) -> None:
        """Append one record; on a full disk, cut off what part of it was written and stop."""
        line = (json.dumps(record) + "\n").encode("utf-8")
        size = os.fstat(self.fh.fileno()).st_size
        try:
            written = 0
            while written < len(line):
                written += self.fh.write(line[written:])
        except OSError as err:
            os.ftruncate(self.fh.fileno(), size)
            if err.errno in FULL:
                raise DiskFull(self.path.parent, len(line)) from err
            message = file_system_problem(err, self.path)
            if message is None:
                raise
            raise StageError(message) from err

    def sync(self) -> None:
        """Make the records so far survive a power cut, not only a kill."""
        os.fsync(self.fh.fileno())

    def __exit__(self, *exc) -> None:
        """Close the file."""
        self.fh.close()


def read_journals(out: Path) -> dict[tuple[str, int], list[dict]]:
    """All journal records per (layer, channel), oldest first, over the journals beside ``out``.

    Unreadable lines (torn by a kill or a full disk) are skipped and counted in the log: their
    neurons are simply described again.
    """
    records: dict[tuple[str, int], list[dict]] = {}
    for path in sorted(out.parent.glob(f"{out.stem}.part-*-of-*.jsonl")):
        torn = 0
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    key = (rec["layer"], int(rec["channel"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    torn += 1
                    continue
                records.setdefault(key, []).append(rec)
        if torn:
            log.warning("%s: %d unreadable (torn) line(s) skipped; their neurons are described "
                        "again", path.name, torn)
    return records


def pick(records: Sequence[dict], key: str) -> dict | None:
    """The record to use for a task: the last good one with ``key``, else the last with ``key``."""
    matching = [r for r in records if r.get("key") == key]
    good = [r for r in matching if not r.get("error") and not clean_answer(r.get("raw"))[1]]
    return (good or matching or [None])[-1]


def task_key(neuron: Neuron, backend: str, model: str, upstream: str, code: str) -> str:
    """Fingerprint of everything that determines a neuron's answer: its mosaic's bytes, the
    upstream runs, backend, model, prompt (and the describer's code for the offline backend)."""
    try:
        mosaic = hashlib.blake2b(Path(neuron.mosaic).read_bytes(), digest_size=16).hexdigest()
    except OSError:
        mosaic = "unreadable"  # described as a failure; a later readable mosaic gets a new key
    parts = [upstream, backend, model, code, neuron.layer, neuron.channel, neuron.level,
             neuron.prompt, mosaic]
    if "#" in neuron.layer and len(neuron.top_ids):  # some of a neuron's crops (09's
        parts.append(neuron.top_ids.tolist())           # sub-concepts): which images they are
    text = json.dumps(parts)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def is_done(records: Sequence[dict], key: str) -> bool:
    """True when the journal holds a usable answer for the task fingerprinted ``key``."""
    rec = pick(records, key)
    return rec is not None and not rec.get("error") and not clean_answer(rec.get("raw"))[1]


# ---------------------------------------------------------------------------------------------
# Reading the inputs


def read_predictions(path: Path) -> dict[int, tuple[list[int], list[float]]]:
    """image id → (top-5 class indices, probabilities) from 01_predictions.csv."""
    return {p.image_id: (list(p.top5_idx), list(p.top5_prob))
            for p in artefacts.read_predictions(path) if p.top5_idx}


def covers_whole_input(rf: np.ndarray, ys: np.ndarray, xs: np.ndarray,
                       input_size: tuple[int, int]) -> np.ndarray:
    """Per cell (ys[i], xs[i]): does its receptive field cover (nearly) all the network input?

    Nearly: at least WHOLE_AREA of the input's area, so that the classifier's label of the whole
    image stands for the crop (deep cells near the border see most, not all, of the image).
    """
    size_h, size_w, jump_h, jump_w, start_h, start_w = (float(v) for v in rf)
    cy, cx = start_h + jump_h * np.asarray(ys), start_w + jump_w * np.asarray(xs)
    h = np.clip(cy + size_h / 2, 0, input_size[0]) - np.clip(cy - size_h / 2, 0, input_size[0])
    w = np.clip(cx + size_w / 2, 0, input_size[1]) - np.clip(cx - size_w / 2, 0, input_size[1])
    return h * w >= WHOLE_AREA * input_size[0] * input_size[1]


def is_imagenet_model(meta01: dict) -> bool:
    """True when 01's model names ImageNet's 1000 classes (a meta from before class names were
    recorded counts as ImageNet: that was the only case then)."""
    if "classes" not in meta01:
        return True
    from common.imagenet import class_names
    return meta01["classes"] == class_names()


def read_labels_or_predictions(path: Path) -> dict[int, tuple[list[int], list[float]]]:
    """image id → its class as (indices, probs): the label where the image is labelled with a
    class of the model, else the model's own top-5 predictions, from 01_predictions.csv."""
    out = read_predictions(path)
    for p in artefacts.read_predictions(path):
        if p.label_idx >= 0:
            out[p.image_id] = ([p.label_idx], [1.0])
    return out


def is_reference_model(meta01: dict) -> bool:
    """True when 01 ran the reference classifier itself (its predictions are the reference view)."""
    spec = meta01.get("model") or {}
    return spec.get("name") == "efficientnet_lite0" and not spec.get("weights") and \
        not spec.get("random_init")


def make_neurons(mosaics_csv: Path, prompts: dict, levels_text: str, domain: str, keywords: str,
                 activations: Path | None) -> tuple[list[Neuron], dict[str, int]]:
    """One Neuron per mosaic row, with its level, prompt and (if known) top image ids."""
    rows = artefacts.read_mosaics(mosaics_csv)
    if not rows:
        raise StageError(f"{mosaics_csv} lists no mosaics; re-run stage 02")
    model_order, tops, input_size = [], {}, (0, 0)
    if activations is not None:
        model_order, input_size, tops = artefacts.read_activations(activations)
    order = artefacts.order_layers((r.layer for r in rows), model_order)
    levels = assign_levels(order, len(prompts["levels"]), parse_levels(levels_text))
    neurons = []
    for r in rows:
        layer, channel, grid, n_tiles = r.layer, r.channel, r.grid, r.n_tiles
        top_ids, whole = np.zeros(0, np.int64), np.zeros(0, bool)
        if r.source_layer in tops:  # a sub-concept's tiles are some of its neuron's top images
            top = tops[r.source_layer]
            ranks = np.array(r.ranks, np.int64) if r.ranks else np.arange(grid * grid)
            ranks = ranks[ranks < top.image_ids.shape[1]]
            top_ids = top.image_ids[channel, ranks]
            whole = covers_whole_input(top.rf, top.y[channel, ranks], top.x[channel, ranks],
                                       input_size) & (top_ids >= 0)
        neurons.append(Neuron(layer=layer, channel=channel, level=levels[layer],
                              mosaic=r.path, grid=grid, tile_px=r.tile_px, n_tiles=n_tiles,
                              prompt=build_prompt(prompts, levels[layer], domain, keywords),
                              top_ids=top_ids, whole=whole))
    return neurons, levels


def model_label_for(backend: str, model: str | None) -> str:
    """What the ``model`` column says for ``backend`` (known without loading anything)."""
    if backend == "offline":
        return OFFLINE_LABEL
    return model or (DEFAULT_HF_MODEL if backend == "hf" else "")


def make_describer(backend: str, n_levels: int, predictions: Path | None, reuse_predictions: bool,
                   model: str | None, device: str, batch_size: int | None, classify_crops: int,
                   temperature: float,
                   top_p: float, max_new_tokens: int, seed: int, base_url: str, api_key_env: str,
                   concurrency: int, timeout: float, retries: int, namer: str = "model",
                   meta01: dict | None = None, unsafe_pickle: bool = False,
                   analysed_model: str | None = None, analysed_weights: str | None = None):
    """Build the backend named ``backend`` with its settings. The offline backend names objects
    with the analysed model (``namer`` "model", described by 01's ``meta01``) unless that model is
    an ImageNet classifier or ``namer`` is "reference"."""
    if backend == "offline":
        from common.imagenet import class_names
        meta01 = meta01 or {}
        if namer == "model" and not is_imagenet_model(meta01):
            spec = meta01.get("model") or {}
            names = meta01.get("classes") or []
            return OfflineDescriber(
                n_levels, read_labels_or_predictions(predictions) if predictions else {}, names,
                classify_tiles=classify_crops, device=device,
                load_classifier=lambda: model_classify(meta01, analysed_model, analysed_weights,
                                                       unsafe_pickle, device),
                phrase=classes_phrase, deep_from_images=True,
                model_label=OWN_LABEL.format(model=spec.get("name", "the analysed model")))
        preds = read_predictions(predictions) if predictions and reuse_predictions else {}
        return OfflineDescriber(n_levels, preds, class_names(), classify_tiles=classify_crops,
                                device=device, model_label=OFFLINE_LABEL if
                                is_imagenet_model(meta01) else ASKED_LABEL)
    if backend == "hf":
        return HFDescriber(model or DEFAULT_HF_MODEL, device=device, batch_size=batch_size or 64,
                           temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                           seed=seed)
    if backend == "openai":
        if not model:
            raise StageError("--backend openai needs --model (the name the server knows the "
                             "model by) and --base-url")
        return OpenAIDescriber(base_url, model, api_key_env=api_key_env, concurrency=concurrency,
                               timeout=timeout, retries=retries, temperature=temperature,
                               top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    raise StageError(f"unknown backend {backend!r}: offline, hf or openai")


# ---------------------------------------------------------------------------------------------
# The stage


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of stage 03."""
    p = stage_parser(__doc__.split("\n")[0])
    p.add_argument("--mosaics", required=True, help="02_mosaics.csv")
    p.add_argument("--activations", default=None, help="01_activations.npz (layer order, top "
                   "images; needed by the offline backend)")
    p.add_argument("--predictions", default=None, help="01_predictions.csv (offline backend)")
    p.add_argument("--out", required=True, help="03_descriptions.csv to write")
    p.add_argument("--backend", choices=["offline", "hf", "openai"], default="offline",
                   help="who writes the descriptions")
    p.add_argument("--model", default=None, help=f"hf: folder or hub id (default "
                   f"{DEFAULT_HF_MODEL}); openai: the server's model name")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="prompt file (YAML or JSON)")
    p.add_argument("--domain", default="", help="what the images are, woven into every prompt, "
                   "e.g. 'chest X-rays' (default: the prompt file's)")
    p.add_argument("--keywords", default="", help="comma-separated terms of the domain")
    p.add_argument("--levels", default="", help="explicit layer=level pairs (1 = earliest); "
                   "other layers get a level by relative depth")
    p.add_argument("--skip-dead", action="store_true", help="leave out neurons the triage flags "
                   "as dead or barely active (common/triage.py; needs --activations, reads the "
                   "01_stats/ beside it)")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), help="describe only share i of N")
    p.add_argument("--merge", action="store_true", help="only assemble the shards' journals")
    p.add_argument("--batch-size", type=int, default=None, help="neurons per batch (hf: 64)")
    p.add_argument("--classify-crops", type=int, default=8, help="offline: crops per neuron the "
                   "classifier labels where the receptive field is smaller than the "
                   "image (whole-image fields reuse 01's labels and predictions)")
    p.add_argument("--namer", choices=["model", "reference"], default="model",
                   help="offline: who says what the top images show: the analysed model (its "
                        "labels, predictions and class names) or the shipped ImageNet reference "
                        "classifier (EfficientNet-Lite0); ImageNet models always use the latter")
    p.add_argument("--analysed-model", default=None,
                   help="offline: the model 01 ran (Make: MODEL), named again so that its file "
                        "is loaded to classify crops; a file is never taken from metadata alone")
    p.add_argument("--analysed-weights", default=None,
                   help="offline: the weights 01 used (Make: WEIGHTS), named again likewise")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="offline: the analysed model is a whole pickled checkpoint you trust "
                        "(as 01's flag); needed to classify crops with it")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=57, help="answer length limit")
    p.add_argument("--seed", type=int, default=0, help="random seed of sampling")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="openai: server URL")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="openai: name of the environment variable holding the API key")
    p.add_argument("--concurrency", type=int, default=8, help="openai: parallel requests")
    p.add_argument("--timeout", type=float, default=120.0, help="openai: seconds per request")
    p.add_argument("--retries", type=int, default=3, help="openai: retries per request")
    p.add_argument("--device", default="auto", help="hf/offline: auto, cpu, cuda …")
    return p


def assemble(out: Path, neurons: Sequence[Neuron], keys: dict[tuple[str, int], str],
             describer_backend: str, model_label: str, metas: list[dict], args: dict,
             levels: dict[str, int]) -> list[dict] | None:
    """Write 03_descriptions.csv and its meta if every neuron has a journal record, else None."""
    records = read_journals(out)
    rows, missing = [], 0
    for n in neurons:
        rec = pick(records.get((n.layer, n.channel), []), keys[(n.layer, n.channel)])
        if rec is None:
            missing += 1
            continue
        text, reason = clean_answer(rec.get("raw")) if not rec.get("error") else ("", rec["error"])
        rows.append({"layer": n.layer, "channel": n.channel, "level": n.level, "description": text,
                     "backend": describer_backend, "model": model_label,
                     "status": "ok" if text else "failed", "reason": reason})
    if missing:
        return None
    meta_file = out.parent / f"{STAGE}.meta.json"
    retract_meta(meta_file)
    write_csv(out, rows, FIELDS)
    failed = [f"{r['layer']}:{r['channel']}" for r in rows if r["status"] == "failed"]
    reasons = Counter(r["reason"].split(":")[0] for r in rows if r["status"] == "failed")
    write_meta(meta_file, STAGE, args, outputs=[out], inputs=metas,
               backend=describer_backend, model=model_label, levels=levels,
               n_ok=len(rows) - len(failed), n_failed=len(failed), failed=failed[:200],
               failure_reasons=dict(reasons.most_common()))
    if failed:
        why = "; ".join(f"{n} × {reason}" for reason, n in reasons.most_common(3))
        # The offline describer's failures (a mosaic without tiles or without anything to
        # measure) come back the same on every try; a VLM's may not.
        retry = describer_backend != "offline"
        log.warning("%d of %d neurons have no description (%s): %s%s. Later stages leave them "
                    "out%s", len(failed), len(rows), why, ", ".join(failed[:10]),
                    " …" if len(failed) > 10 else "",
                    "; the stage stays out of date for make, and the next `make all` (or run of "
                    "this stage) asks again for those neurons only" if retry else "")
        if retry:
            os.utime(meta_file, (0, 0))  # older than any input: make runs the stage again
    log.info("%d descriptions → %s", len(rows), out)
    return rows


def run(mosaics: Path, out: Path, activations: Path | None = None,
        predictions: Path | None = None, describer=None, backend: str = "offline",
        model: str | None = None, prompts_path: Path = DEFAULT_PROMPTS, domain: str = "",
        keywords: str = "", levels: str = "", shard: tuple[int, int] = (0, 1),
        merge_only: bool = False, batch_size: int | None = None, skip_dead: bool = False,
        args: dict | None = None, namer: str = "model", unsafe_pickle: bool = False,
        **backend_settings) -> list[dict] | None:
    """Describe the shard's neurons not yet done, journal them, and assemble the CSV when complete.

    ``describer`` (any object with ``backend``, ``describe(neurons)`` and a batch size) replaces
    the backend built from ``backend``/``model``/``backend_settings`` — tests pass fakes here.
    Returns the rows written, or None when other shards still have neurons to describe.
    """
    prompts = load_prompts(prompts_path)
    sweep_temporaries(out.parent)  # what a killed earlier run left half-written
    neurons, level_map = make_neurons(mosaics, prompts, levels, domain, keywords, activations)
    if skip_dead:
        from common.triage import dead_neurons
        if activations is None:
            raise StageError("--skip-dead needs --activations (its 01_stats/ folder is read)")
        dead = dead_neurons(activations.parent / "01_stats", level_map)
        neurons = [n for n in neurons if (n.layer, n.channel) not in dead]
        log.info("--skip-dead: %d neurons flagged dead or barely active are not described",
                 len(dead))
    metas = [read_meta(mosaics)] + [read_meta(p) for p in (activations, predictions) if p]
    lineage = merge_lineage(metas)  # refuse, before any work, inputs from different runs
    meta01 = read_meta(activations) if activations else {}
    if describer is None and not merge_only:
        describer = make_describer(
            backend, len(prompts["levels"]), predictions, is_reference_model(meta01), model,
            batch_size=batch_size, namer=namer, meta01=meta01, unsafe_pickle=unsafe_pickle,
            **backend_settings)
    backend_name = describer.backend if describer else backend
    model_label = describer.model_label if describer else model_label_for(backend, model)
    # What every answer depends on besides its own mosaic and prompt: the mosaics' and the
    # analysed model's runs (its activations, labels and predictions), its class names, and who
    # names objects; the offline text also depends on this script's code, a VLM's does not.
    upstream = json.dumps([lineage.get("02_mosaics", metas[0].get("fingerprint", "")),
                           lineage.get("01_extract", ""), meta01.get("model"),
                           meta01.get("classes"), namer])
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12] \
        if backend_name == "offline" else ""
    keys = {(n.layer, n.channel): task_key(n, backend_name, model_label, upstream, code)
            for n in neurons}

    if not merge_only:
        mine = [neurons[i] for i in shard_slice(len(neurons), shard)]
        done = read_journals(out)
        todo = [n for n in mine if not is_done(done.get((n.layer, n.channel), []),
                                               keys[(n.layer, n.channel)])]
        log.info("%s backend: %d of %d neurons of shard %d/%d to describe (%d already done)",
                 backend_name, len(todo), len(mine), shard[0], shard[1], len(mine) - len(todo))
        size = max(1, batch_size or getattr(describer, "batch_size", 16))
        # A backend that answers neuron by neuron hands each answer over as it arrives.
        stream = getattr(describer, "describe_as_completed", None)
        with Journal(journal_path(out, shard)) as journal, \
                tqdm(total=len(todo), desc="03 describe", unit="neuron", disable=None) as bar:
            for start in range(0, len(todo), size):
                batch = todo[start:start + size]
                answers = stream(batch) if stream else enumerate(describer.describe(batch))
                for i, (raw, error) in answers:
                    n = batch[i]
                    journal.add({"layer": n.layer, "channel": n.channel, "level": n.level,
                                 "key": keys[(n.layer, n.channel)], "raw": raw, "error": error})
                    bar.update()
                journal.sync()
    rows = assemble(out, neurons, keys, backend_name, model_label, metas, dict(args or {}),
                    level_map)
    if rows is None and shard[1] == 1 and not merge_only:
        raise StageError("some neurons still have no journal record after describing them all "
                         "(see the warnings above); run the stage again to describe them")
    if rows is None:
        log.info("shard %d/%d done; %s is written once every shard has finished (or run with "
                 "--merge)", shard[0], shard[1], out.name)
        if merge_only:
            raise StageError("cannot merge: some neurons have no description yet with these "
                             "settings; run the missing shards (--shard i/N) first")
    return rows


@exit_on_stage_error
def main(argv=None):
    """Parse flags and describe the neurons."""
    args = start_stage(build_parser(), argv, keep_memory=True)
    run(Path(args.mosaics), Path(args.out),
        activations=Path(args.activations) if args.activations else None,
        predictions=Path(args.predictions) if args.predictions else None,
        backend=args.backend, model=args.model, prompts_path=Path(args.prompts),
        domain=args.domain, keywords=args.keywords, levels=args.levels, shard=args.shard,
        merge_only=args.merge, batch_size=args.batch_size, skip_dead=args.skip_dead,
        args=vars(args),
        device=args.device, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, seed=args.seed, base_url=args.base_url,
        classify_crops=args.classify_crops, namer=args.namer, unsafe_pickle=args.unsafe_pickle,
        analysed_model=args.analysed_model, analysed_weights=args.analysed_weights,
        api_key_env=args.api_key_env, concurrency=args.concurrency, timeout=args.timeout,
        retries=args.retries)


if __name__ == "__main__":
    main()
