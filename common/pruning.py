"""Causal checks by pruning: switch groups of neurons off and see what the model then predicts.

Used by 11 (pruning a basket) and 13 (zeroing the neurons aligned with spurious concepts). The
model is the one 01 ran, named again by the user (a meta never chooses code to run); images are the
labelled ones of 01_predictions.csv, prepared exactly as 01 prepared them. Channels are zeroed
with ``common.hooks.ablate_channels`` (a forward hook).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from common.cli import StageError

log = logging.getLogger("neuron-atlas.pruning")


def load_run_model(extract_meta: dict, model: str | None = None, weights: str | None = None,
                   unsafe_pickle: bool = False, device: str = "auto"):
    """The model 01 ran (the ``model`` entry of its meta), as the user names it again
    (``common.models.reload_model``: a meta never chooses code to run)."""
    from common.models import reload_model
    return reload_model(extract_meta, model, weights, unsafe_pickle, device)


@dataclass
class Labelled:
    """The labelled images a causal check runs on, as input tensors."""

    ids: list[int]           # image ids, in order
    labels: np.ndarray       # class index per image
    tensors: "object"        # n × 3 × H × W float16 tensor
    class_names: dict[int, str]


def labelled_images(predictions: list[dict], bundle, per_class: int, seed: int) -> Labelled:
    """Up to ``per_class`` labelled images of every class (a seeded sample), loaded as 01 did.

    ``predictions``: rows of 01_predictions.csv (``common.artefacts.read_predictions``). An image
    that no longer loads is left out with a warning.
    """
    import torch
    from common.images import BadImage, load_rgb, network_input, to_tensor
    rows = [r for r in predictions if r.label_idx >= 0]
    if not rows:
        raise StageError("no labelled image in 01_predictions.csv (label_idx ≥ 0): a causal check "
                         "needs class labels. Give 01 labelled images (class sub-folders or a "
                         "label column)")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[dict]] = {}
    for r in rows:
        by_class.setdefault(r.label_idx, []).append(r)
    chosen = []
    for label in sorted(by_class):
        group = by_class[label]
        pick = rng.choice(len(group), size=min(per_class, len(group)), replace=False)
        chosen += [group[i] for i in sorted(pick)]
    ids, labels, tensors = [], [], []
    for r in tqdm(chosen, desc="load labelled images", unit="img", disable=None, leave=False):
        try:
            img, _ = load_rgb(r.path)
        except (BadImage, OSError) as err:
            log.warning("image %s (%s) left out of the causal check: %s", r.image_id, r.path,
                        getattr(err, "reason", err))
            continue
        ids.append(r.image_id)
        labels.append(r.label_idx)
        tensors.append(to_tensor(network_input(img, bundle.input_size), bundle.mean,
                                 bundle.std).half())
    names = {r.label_idx: r.label or str(r.label_idx) for r in rows}
    return Labelled(ids=ids, labels=np.array(labels, np.int64),
                    tensors=torch.stack(tensors) if tensors else torch.zeros(0),
                    class_names=names)


def predict(bundle, images: Labelled, ablation: dict[str, list[int]] | None,
            batch_size: int = 32, desc: str = "predict") -> np.ndarray:
    """Softmax outputs (n × classes) of the labelled images, with ``ablation`` zeroed if given."""
    import torch
    from common.hooks import ablate_channels
    out = []
    ctx = ablate_channels(bundle.model, ablation) if ablation else contextlib.nullcontext()
    with ctx, torch.inference_mode():
        for start in tqdm(range(0, len(images.ids), batch_size), desc=desc, unit="batch",
                          disable=None, leave=False):
            batch = images.tensors[start:start + batch_size].float().to(bundle.device)
            out.append(torch.softmax(bundle.model(batch).float(), dim=1).cpu().numpy())
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


def class_name(bundle, images, label: int) -> str:
    """The model's name of class ``label`` (else the dataset's label text)."""
    names = bundle.class_names or []
    return names[label] if 0 <= label < len(names) else str(images.class_names.get(label, label))
