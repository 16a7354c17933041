"""Stage 15 — label every neuron with its best concept of a list, and list per layer the concepts
no neuron encodes (SemanticLens's labelling, §3.3 and §4.1.2 of its paper). On request:
`make label` (CONCEPTS=file; empty: the shipped list common/concepts.txt).

Reads (see ARTEFACTS.md), in the run folder (--run): 04_embeddings.npz, 04_crops.npz (when 04's
image and text vectors share one space) and 01_activations.npz (the layer order), with metas.
Writes 15_labels.csv (per neuron: its best concept, the scores, labelled or not),
15_concepts.csv (per layer and concept: neurons labelled and aligned, missing or not) and
15_label.meta.json.

Each concept is embedded by 04's text model, and so is the empty text. A neuron's score with a
concept is cos(neuron, concept) − cos(neuron, empty text) (Eq. 4: the empty text's similarity is
what any phrase gains from the text model alone); its label is its best concept when that score
exceeds --margin, else "unlabelled". A concept no neuron of a layer exceeds the margin with is
missing there. The neuron vector lives in the concepts' space: when 04's image embedder shares the
text model's space (both towers of one CLIP), it is the mean of the image vectors of the neuron's
top crops (Eq. 2); otherwise (the offline default: the CNN's image vectors are in no text space)
it is the neuron's sentence embedded by the text model, as 07's search and 13's audit compare.

Example:
  python 15_label.py --run data/demo
  python 15_label.py --run data/demo --concepts my_concepts.txt --margin 0.25
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.artefacts import (LabelConceptRow, LabelRow, Run, columns, read_crop_vectors,
                              read_embeddings, read_layer_order)
from common.cli import (StageError, add_run, add_settings, exit_on_stage_error, setting,
                        settings_from, stage_parser, start_stage)
from common.concepts import SHIPPED, alignments, read_concepts
from common.embedders import l2_normalise
from common.io import sweep_temporaries, write_csv
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta

log = logging.getLogger("neuron-atlas.15_label")

STAGE = "15_label"
UNLABELLED = "unlabelled"  # the label of a neuron no concept exceeds the margin with
MARGIN = 0.3  # a neuron's best of several hundred concepts clears 13's 0.2 almost always (demo,
              # shipped list: 511 of 512 neurons, labels such as "camera" for a bell cote); 0.3
              # is about the 99th percentile of all neuron × concept scores there (0.29)


@dataclass(frozen=True)
class Settings:
    """Stage 15's settings: one flag each (``--concepts`` …), defaults written here only."""

    concepts: str = setting("", "file of concept phrases, one per line (empty: the shipped list "
                            "common/concepts.txt)", make="CONCEPTS")
    margin: float = setting(MARGIN, "score (cosine − empty-text cosine) a concept must exceed to "
                            "label a neuron (0: any gain over the empty text, as in SemanticLens)",
                            make="LABEL_MARGIN")
    device: str = setting("auto", "auto (cuda if present), cpu, cuda …", make="DEVICE")


def neuron_vectors(run: Run, emb) -> tuple[list[tuple[str, int]], np.ndarray, str]:
    """The neurons labelled, their vectors in the text model's space, and which vectors they are:
    ``image`` (mean of the top crops' image vectors, when 04 fused text and image as one space)
    or ``text`` (the sentence's vector). Neurons without a vector are left out."""
    if emb.fusion == "mean":
        crops = read_crop_vectors(run.crop_vectors)
        keys = [(str(layer), int(c)) for layer, c in zip(crops.arrays["layer"],
                                                           crops.arrays["channel"])]
        means = [crops.of(*key).mean(axis=0) if len(crops.of(*key)) else None for key in keys]
        keep = [i for i, m in enumerate(means) if m is not None]
        return [keys[i] for i in keep], l2_normalise(np.stack([means[i] for i in keep])), "image"
    keep = np.flatnonzero(np.linalg.norm(emb.text, axis=1) > 0)
    return [emb.keys()[i] for i in keep], emb.text[keep], "text"


def label_layer(layer: str, channels: list[int], scores: np.ndarray, cosines: np.ndarray,
                baseline: np.ndarray, concepts: list[str], margin: float
                ) -> tuple[list[dict], list[dict]]:
    """Rows of 15_labels.csv and 15_concepts.csv for one layer from its neurons × concepts
    ``scores`` (cosine − baseline), ``cosines`` and each neuron's ``baseline``."""
    best = scores.argmax(axis=1)  # ties: the earlier concept of the list
    labels = []
    for row, channel in enumerate(channels):
        k = int(best[row])
        score = float(scores[row, k])
        labelled = score > margin
        labels.append({"layer": layer, "channel": channel,
                       "label": concepts[k] if labelled else UNLABELLED, "concept": concepts[k],
                       "cosine": round(float(cosines[row, k]), 4),
                       "baseline": round(float(baseline[row]), 4), "score": round(score, 4),
                       "margin": round(score - margin, 4), "labelled": int(labelled)})
    aligned = scores > margin
    top = scores.argmax(axis=0)
    rows = [{"layer": layer, "concept": concept,
             "labelled": int(sum(r["labelled"] and r["concept"] == concept for r in labels)),
             "aligned": int(aligned[:, k].sum()),
             "best_score": round(float(scores[top[k], k]), 4),
             "best_channel": channels[int(top[k])], "missing": int(not aligned[:, k].any())}
            for k, concept in enumerate(concepts)]
    return labels, rows


def run(run: Run, settings: Settings = Settings(), text_embedder=None,
        args: dict | None = None) -> dict[str, list[dict]]:
    """Label the neurons of ``run``; write 15_labels.csv, 15_concepts.csv and the meta.

    ``text_embedder`` replaces 04's text model (tests pass a small one; it must carry 04's
    name). Returns {"labels": rows, "concepts": rows}.
    """
    from common.search import check_embedder, loader_name
    concepts_path = Path(settings.concepts) if settings.concepts else SHIPPED
    concepts = read_concepts(concepts_path)
    metas = [read_meta(run.activations), read_meta(run.embeddings)]
    merge_lineage(metas)  # refuse, before any work, inputs that come from different runs
    emb = read_embeddings(run.embeddings)
    keys, vectors, kind = neuron_vectors(run, emb)
    if not keys:
        raise StageError(f"{run.embeddings} holds no neuron vector to label: re-run 04 (make all)")
    if text_embedder is None:
        from common.embedders import load_text_embedder
        text_embedder = load_text_embedder(loader_name(emb.text_model, "text"),
                                           device=settings.device)
    check_embedder(text_embedder, emb.text_model, emb.text, "text")
    concept_vectors = text_embedder.encode(concepts)
    empty = text_embedder.encode([""])[0]
    log.info("%d neurons (%s vectors) against %d concepts of %s, margin %g", len(keys), kind,
             len(concepts), concepts_path, settings.margin)
    scores, baseline = alignments(vectors, concept_vectors, empty)
    cosines = scores + baseline[:, None]
    order = read_layer_order(run.activations)
    present = {layer for layer, _ in keys}
    label_rows, concept_rows = [], []
    for layer in [ly for ly in order if ly in present] + sorted(present - set(order)):
        rows = sorted((c, i) for i, (ly, c) in enumerate(keys) if ly == layer)
        index = [i for _, i in rows]
        labels, per_concept = label_layer(layer, [c for c, _ in rows], scores[index],
                                          cosines[index], baseline[index], concepts,
                                          settings.margin)
        label_rows += labels
        concept_rows += per_concept
        n_missing = sum(r["missing"] for r in per_concept)
        log.info("%s: %d of %d neurons labelled; %d of %d concepts missing", layer,
                 sum(r["labelled"] for r in labels), len(labels), n_missing, len(concepts))
    sweep_temporaries(run.folder)  # what a killed earlier run left half-written
    retract_meta(run.meta(STAGE))
    write_csv(run.labels, label_rows, columns(LabelRow))
    write_csv(run.label_concepts, concept_rows, columns(LabelConceptRow))
    write_meta(run.meta(STAGE), STAGE, dict(args or {}),
               outputs=[run.labels, run.label_concepts], inputs=metas, vectors=kind,
               text_model=emb.text_model, margin=settings.margin,
               concepts=settings.concepts or "common/concepts.txt (shipped)",
               n_concepts=len(concepts), n_neurons=len(label_rows),
               n_labelled=sum(r["labelled"] for r in label_rows))
    return {"labels": label_rows, "concepts": concept_rows}


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of stage 15: ``--run`` and the fields of ``Settings``."""
    p = stage_parser(__doc__.split("\n")[0])
    add_run(p, "04_embeddings.npz, 04_crops.npz and 01_activations.npz",
            "15_labels.csv and 15_concepts.csv")
    add_settings(p, Settings)
    return p


@exit_on_stage_error
def main(argv=None):
    """Parse flags and label the neurons."""
    args = start_stage(build_parser(), argv)
    run(Run(args.run), settings_from(Settings, args), args=vars(args))


if __name__ == "__main__":
    main()
