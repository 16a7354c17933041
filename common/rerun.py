"""Re-run 01's model on 01's images: the one place that loads the model again, prepares images
exactly as 01 prepared them, and predicts — optionally with some channels switched off.

Used by 08 (its causal check and the relevance of misclassified images), 11 (pruning a basket)
and 13 (per-class relevance, zeroing spurious neurons). The model is the one 01 ran, named again
by the user (a meta never chooses code to run). Images are float32 tensors, the very input 01 gave
the model, so a prediction here equals 01's; a set of images is held in memory only where it is
predicted several times (``load_images``), a single pass streams them (``image_batches``).
Channels are zeroed with ``common.hooks.ablate_channels`` (a forward hook).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from common.cli import StageError

log = logging.getLogger("neuron-atlas.rerun")


def load_run_model(extract_meta: dict, model: str | None = None, weights: str | None = None,
                   unsafe_pickle: bool = False, device: str = "auto"):
    """The model 01 ran (the ``model`` entry of its meta), as the user names it again
    (``common.models.reload_model``: a meta never chooses code to run)."""
    from common.models import reload_model
    return reload_model(extract_meta, model, weights, unsafe_pickle, device)


def image_loader(bundle) -> Callable[[str], "object"]:
    """``path → input tensor`` (float32, 3 × H × W) exactly as 01 prepared the image for
    ``bundle`` (its input size, mean and std); raises BadImage or OSError for a bad file."""
    from common.images import load_rgb, network_input, to_tensor

    def load(path: str):
        img, _ = load_rgb(path)
        return to_tensor(network_input(img, bundle.input_size), bundle.mean, bundle.std)
    return load


@dataclass
class Images:
    """Images held as model inputs: ids, class labels (-1: none) and an n × 3 × H × W tensor."""

    ids: list[int]
    labels: np.ndarray
    tensors: "object"
    class_names: dict[int, str]

    def select(self, keep: Sequence[int] | np.ndarray) -> "Images":
        """The images whose ids are in ``keep`` (a list of ids), or where ``keep`` (a boolean
        mask over these images) is true, in this set's order."""
        if isinstance(keep, np.ndarray) and keep.dtype == bool:
            mask = keep
        else:
            wanted = set(int(i) for i in keep)
            mask = np.array([i in wanted for i in self.ids], dtype=bool)
        rows = np.flatnonzero(mask)
        return Images(ids=[self.ids[r] for r in rows], labels=self.labels[rows],
                      tensors=self.tensors[rows] if len(rows) else self.tensors[:0],
                      class_names=self.class_names)


def _readable(items, load, desc: str) -> Iterator[tuple[int, int, object]]:
    """``(id, label, tensor)`` of each ``(id, path, label)`` that loads; the others are left out
    with a warning naming the image and the reason."""
    from common.images import BadImage
    for image_id, path, label in tqdm(items, desc=desc, unit="img", disable=None, leave=False):
        try:
            tensor = load(path)
        except (BadImage, OSError) as err:
            log.warning("image %s (%s) left out: %s", image_id, path, getattr(err, "reason", err))
            continue
        yield image_id, label, tensor


def load_images(bundle, items: Sequence[tuple[int, str, int]], class_names: dict[int, str],
                load=None, desc: str = "load images") -> Images:
    """``items`` — (image id, path, label) — loaded as model inputs (``load``: path → tensor,
    default :func:`image_loader`). An image that no longer loads is left out with a warning."""
    import torch
    got = list(_readable(items, load or image_loader(bundle), desc))
    return Images(ids=[g[0] for g in got], labels=np.array([g[1] for g in got], np.int64),
                  tensors=torch.stack([g[2] for g in got]) if got else torch.zeros(0),
                  class_names=class_names)


def image_batches(bundle, items: Sequence[tuple[int, str, int]], batch_size: int,
                  desc: str = "images",
                  load=None) -> Iterator[tuple[list[int], np.ndarray, object]]:
    """``(ids, labels, tensor)`` batches of the readable ``items`` — (id, path, label) — loaded
    as 01 did (``load``: path → tensor, default :func:`image_loader`), ``batch_size`` at a time:
    one pass over many images without holding them all."""
    import torch
    readable = _readable(items, load or image_loader(bundle), desc)
    while batch := list(itertools.islice(readable, batch_size)):
        yield [g[0] for g in batch], np.array([g[1] for g in batch]), \
            torch.stack([g[2] for g in batch])


def labelled_rows(predictions: list) -> list:
    """The labelled rows of 01_predictions.csv (``common.artefacts.read_predictions``); a
    StageError naming the fix when there are none."""
    rows = [r for r in predictions if r.label_idx >= 0]
    if not rows:
        raise StageError("no labelled image in 01_predictions.csv (label_idx ≥ 0): a causal "
                         "check needs class labels. Give 01 labelled images (class sub-folders "
                         "or a label column)")
    return rows


def dataset_class_names(rows: list) -> dict[int, str]:
    """Class index → the dataset's label text (the index when there is none)."""
    return {r.label_idx: r.label or str(r.label_idx) for r in rows}


def labelled_images(predictions: list, bundle, per_class: int, seed: int) -> Images:
    """Up to ``per_class`` labelled images of every class (a seeded sample), loaded as 01 did.

    ``predictions``: rows of 01_predictions.csv (``common.artefacts.read_predictions``). An image
    that no longer loads is left out with a warning.
    """
    rows = labelled_rows(predictions)
    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for r in rows:
        by_class.setdefault(r.label_idx, []).append(r)
    chosen = []
    for label in sorted(by_class):
        group = by_class[label]
        pick = rng.choice(len(group), size=min(per_class, len(group)), replace=False)
        chosen += [group[i] for i in sorted(pick)]
    return load_images(bundle, [(r.image_id, r.path, r.label_idx) for r in chosen],
                       dataset_class_names(rows), desc="load labelled images")


def predict(bundle, images: Images, ablation: dict[str, list[int]] | None = None,
            batch_size: int = 32, desc: str = "predict", logits: bool = False) -> np.ndarray:
    """Softmax outputs (n × classes) of ``images`` — the logits themselves with ``logits`` —
    with the channels of ``ablation`` (layer → channels) zeroed if given."""
    import torch
    from common.hooks import ablate_channels
    out = []
    ctx = ablate_channels(bundle.model, ablation) if ablation else contextlib.nullcontext()
    with ctx, torch.inference_mode():
        for start in tqdm(range(0, len(images.ids), batch_size), desc=desc, unit="batch",
                          disable=None, leave=False):
            batch = images.tensors[start:start + batch_size].to(bundle.device)
            raw = bundle.model(batch).float()
            out.append((raw if logits else torch.softmax(raw, dim=1)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def per_class(probs: np.ndarray, labels: np.ndarray) -> dict[int, dict]:
    """Per true class: images, accuracy, mean probability of the true class, and the counts of
    the classes its images are predicted as."""
    pred = probs.argmax(axis=1)
    out = {}
    for label in np.unique(labels):
        mine = labels == label
        counts = np.bincount(pred[mine])
        out[int(label)] = {"n": int(mine.sum()), "accuracy": float((pred[mine] == label).mean()),
                           "p_true": float(probs[mine, label].mean()),
                           "predicted": {int(c): int(counts[c]) for c in np.flatnonzero(counts)}}
    return out


def class_name(bundle, images: Images, label: int) -> str:
    """The model's name of class ``label`` (else the dataset's label text)."""
    names = bundle.class_names or []
    return names[label] if 0 <= label < len(names) else str(images.class_names.get(label, label))
