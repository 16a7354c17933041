"""Stage 12 — compare two runs (two models, or one model on two image sets): which neurons of A
have a counterpart in B, how the layers line up, which concepts only one of them has, and their
interpretability scores side by side (SemanticLens's model comparison).

Reads from each run folder (see ARTEFACTS.md): 04_embeddings.npz (the neurons' vectors),
03_descriptions.csv (sentences shown beside the matches), 05_clusters.csv (concepts) and
09_summary.csv (per-layer scores; optional). Both runs must be embedded by the same text and
image embedders, or their vectors are not comparable.
Writes into <run>/12_compare__<other>/ (the folder's name after the other run's):
  12_matches.csv     one row per neuron of A and of B: its best match in the other run, cosine,
                     whether the match is mutual, both sentences
  12_alignment.csv   layer of A × layer of B: mean best-match cosine A→B and B→A
  12_alignment.png   the two matrices as heatmaps
  12_concepts.csv    every concept (cluster) of A and of B: its closest concept in the other run
                     and whether it has a counterpart (cosine ≥ --concept-threshold)
  12_scores.csv      09's per-layer scores of both runs, one row per run and layer
  12_report.md       the figures in words
  12_compare.meta.json

Example:
  python 12_compare.py --run data/lite0 --other data/lite1     # → data/lite0/12_compare__lite1/
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from common import artefacts
from common.artefacts import columns
from common.cli import (StageError, add_run, add_settings, exit_on_stage_error, setting,
                        settings_from, stage_parser, start_stage)
from common.io import sweep_temporaries, write_bytes, write_csv, write_text
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta

log = logging.getLogger("neuron-atlas.12_compare")

STAGE = "12_compare"
SCORE_COLUMNS = columns(artefacts.CompareScoreRow)[2:]  # after run and layer


@dataclasses.dataclass(frozen=True)
class Settings:
    """Stage 12's settings: one flag each, defaults written here only."""

    kind: str = setting("fused", "04 vectors compared (and 05 clusters of that kind)",
                        make="COMPARE_KIND", choices=("fused", "text"))
    concept_threshold: float = setting(
        0.9, "a concept has a counterpart when the closest concept of the other run is at least "
        "this close (cosine of the centroids)")


class RunVectors:
    """The artefacts of one run that 12 reads."""

    def __init__(self, folder: Path, kind: str):
        """Read ``folder``'s embeddings (vectors of ``kind``), sentences, concepts and scores."""
        self.folder, self.name = folder, folder.name
        from common.artefacts import (description_texts, read_clusters, read_descriptions,
                                      read_embeddings, read_keywords, read_summary)
        run = artefacts.Run(folder)
        path = run.embeddings
        if not path.is_file():
            raise StageError(f"{path} not found: run the stages up to 04 for {folder} "
                             f"(make all RUN={folder.name})")
        emb = read_embeddings(path)
        metas = [read_meta(path)]  # the lineage of all that is compared: 04, 05 and 09
        self.text_model, self.image_model = emb.text_model, emb.image_model
        vectors = getattr(emb, kind)
        self.vectors, self.channels = {}, {}
        for layer in layer_order(folder, emb.layer):
            rows = np.flatnonzero(emb.layer == layer)
            self.vectors[layer] = vectors[rows].astype(np.float64)
            self.channels[layer] = emb.channel[rows]
        self.sentences = description_texts(read_descriptions(run.descriptions,
                                                             required=False))
        clusters = run.clusters
        self.clusters = [r for r in read_clusters(clusters) if r.kind == kind] \
            if clusters.is_file() else []
        if clusters.is_file():
            metas.append(read_meta(clusters))
        keywords = run.keywords
        self.keywords: dict[tuple[str, int], list[str]] = {}
        if keywords.is_file():
            for r in read_keywords(keywords):
                if r.kind == kind and r.cluster is not None:
                    self.keywords.setdefault((r.layer, r.cluster), []).append(r.term)
        summary = run.summary
        # An undefined mean (NaN) is an empty cell, as 09 writes it.
        self.scores = [{k: "" if isinstance(v, float) and math.isnan(v) else v
                        for k, v in dataclasses.asdict(r).items()} for r in read_summary(summary)] \
            if summary.is_file() else []
        if summary.is_file():
            metas.append(read_meta(summary))
        self.lineage = merge_lineage(metas)


def layer_order(folder: Path, layers: np.ndarray) -> list[str]:
    """The layers of ``layers`` in model order (01's list when present, else as 04 stored them)."""
    from common.artefacts import order_layers, read_layer_order
    path = artefacts.Run(folder).activations
    return order_layers(layers.tolist(), read_layer_order(path) if path.is_file() else [])


def stack(run: RunVectors) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """All of a run's vectors in one matrix, with (layer, channel) per row."""
    keys = [(layer, int(c)) for layer in run.vectors for c in run.channels[layer]]
    return np.concatenate(list(run.vectors.values())), keys


def neuron_matches(a: RunVectors, b: RunVectors) -> list[dict]:
    """Each neuron of A matched to its closest neuron of B (any layer) and back; "mutual" when
    each is the other's best match."""
    from common.compare import best_matches
    va, ka = stack(a)
    vb, kb = stack(b)
    ab, sim_ab = best_matches(va, vb)
    ba, sim_ba = best_matches(vb, va)
    rows = []
    for side, keys, other_keys, best, sim, back, mine, theirs in (
            ("A", ka, kb, ab, sim_ab, ba, a, b), ("B", kb, ka, ba, sim_ba, ab, b, a)):
        for i, key in enumerate(keys):
            match = other_keys[best[i]]
            rows.append({"side": side, "layer": key[0], "channel": key[1],
                         "match_layer": match[0], "match_channel": match[1],
                         "cosine": round(float(sim[i]), 4), "mutual": int(back[best[i]] == i),
                         "description": mine.sentences.get(key, ""),
                         "match_description": theirs.sentences.get(match, "")})
    return rows


def concept_rows(a: RunVectors, b: RunVectors, kind: str, threshold: float) -> list[dict]:
    """Every concept (05 cluster) of each run with its closest concept of the other run."""
    from common.compare import centroids

    def concepts(run: RunVectors):
        """Centroids of the run's clusters, with (layer, cluster, size, example sentence)."""
        where = {(layer, int(c)): (layer, i) for layer in run.vectors
                 for i, c in enumerate(run.channels[layer])}
        vecs, info = [], []
        for layer in run.vectors:
            members = [r for r in run.clusters if r.layer == layer and (layer, r.channel) in where]
            rows = [where[(layer, r.channel)][1] for r in members]
            labels = np.array([r.cluster for r in members])
            if not rows:
                continue
            cents, keys = centroids(run.vectors[layer][rows], labels)
            for vec, key in zip(cents, keys):
                first = next(r for r in members if r.cluster == key)
                vecs.append(vec)
                info.append((layer, int(key), int((labels == key).sum()),
                             run.sentences.get((layer, first.channel), "")))
        return (np.stack(vecs) if vecs else None), info  # None: no concept, never compared

    ca, ia = concepts(a)
    cb, ib = concepts(b)
    if not len(ia) or not len(ib):
        log.warning("one run has no 05 clusters of kind %s: concepts are not compared", kind)
        return []
    rows = []
    for side, cents, info, other, other_info, run in (("A", ca, ia, cb, ib, a),
                                                     ("B", cb, ib, ca, ia, b)):
        sim = cents @ other.T
        for i, (layer, cluster, size, example) in enumerate(info):
            j = int(sim[i].argmax())
            rows.append({"side": side, "layer": layer, "cluster": cluster, "size": size,
                         "match_layer": other_info[j][0], "match_cluster": other_info[j][1],
                         "cosine": round(float(sim[i, j]), 4),
                         "counterpart": int(sim[i, j] >= threshold),
                         "keywords": " ".join(run.keywords.get((layer, cluster), [])[:5]),
                         "example": example})
    return rows


def plot_alignment(ab: np.ndarray, ba: np.ndarray, layers_a: list[str], layers_b: list[str],
                   names: tuple[str, str], path: Path) -> None:
    """Two heatmaps: A's layers against B's (A→B) and B's against A's (B→A)."""
    import io
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    side = max(len(layers_a), len(layers_b))
    fig, axes = plt.subplots(1, 2, figsize=(3 + 1.6 * side, 1.8 + 0.7 * side))
    low = float(np.nanmin([ab.min(), ba.min()]))
    for ax, mat, rows, cols, title in ((axes[0], ab, layers_a, layers_b, f"{names[0]} → {names[1]}"),
                                       (axes[1], ba, layers_b, layers_a, f"{names[1]} → {names[0]}")):
        im = ax.imshow(mat, vmin=low, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < (low + 1) / 2 else "black")
        ax.set_title(f"{title}: mean best-match cosine", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def report(a: RunVectors, b: RunVectors, matches: list[dict], align: list[dict],
           concepts: list[dict], scores: list[dict], threshold: float, kind: str) -> str:
    """The comparison in words (Markdown); sentences are model text, so they are not included."""
    lines = [f"# {a.name} compared with {b.name}", "",
             f"Vectors: 04's {kind} embeddings ({a.text_model} / {a.image_model}).", ""]
    for side, run, other in (("A", a, b), ("B", b, a)):
        mine = [r for r in matches if r["side"] == side]
        same = sum(r["layer"] == r["match_layer"] and r["channel"] == r["match_channel"]
                   for r in mine)
        lines.append(f"- {run.name}: {len(mine)} neurons; mean best-match cosine in {other.name} "
                     f"{np.mean([r['cosine'] for r in mine]):.3f}; mutual best matches "
                     f"{sum(r['mutual'] for r in mine)}; matched to the same layer and channel "
                     f"{same}.")
    lines += ["", "## Layer alignment (mean best-match cosine)", "",
              "| layer of A | layer of B | A→B | B→A |", "|---|---|---|---|"]
    lines += [f"| `{r['layer_a']}` | `{r['layer_b']}` | {r['a_to_b']} | {r['b_to_a']} |"
              for r in align]
    lines += ["", f"## Concepts without a counterpart (closest concept cosine < {threshold})", ""]
    for side, run in (("A", a), ("B", b)):
        alone = [r for r in concepts if r["side"] == side and not r["counterpart"]]
        total = sum(r["side"] == side for r in concepts)
        lines.append(f"- {run.name}: {len(alone)} of {total} concepts"
                     + (": " + "; ".join(f"`{r['layer']}` #{r['cluster']} ({r['size']} neurons, "
                                         f"cosine {r['cosine']})" for r in alone[:10])
                        if alone else ""))
    if scores:
        lines += ["", "## Interpretability scores (09) per layer", "",
                  "| run | layer | " + " | ".join(SCORE_COLUMNS) + " |",
                  "|---|---|" + "---|" * len(SCORE_COLUMNS)]
        lines += [f"| {r['run']} | `{r['layer']}` | " + " | ".join(str(r.get(c, ""))
                                                              for c in SCORE_COLUMNS) + " |"
                  for r in scores]
    return "\n".join(lines) + "\n"


def run(run: artefacts.Run, other: artefacts.Run, settings: Settings = Settings(),
        args: dict | None = None) -> dict:
    """Compare ``run`` with ``other``; write 12's files into the run's folder of the comparison
    (``Run.comparison``)."""
    from common.compare import alignment_matrix
    kind, concept_threshold = settings.kind, settings.concept_threshold
    run_a, run_b = run.folder, other.folder
    out = run.comparison(run_b.name)
    a, b = RunVectors(run_a, kind), RunVectors(run_b, kind)
    if (a.text_model, a.image_model) != (b.text_model, b.image_model):
        raise StageError(f"the runs were embedded differently ({a.name}: {a.text_model} / "
                         f"{a.image_model}; {b.name}: {b.text_model} / {b.image_model}); their "
                         f"vectors are not comparable. Re-run 04 of one with the other's "
                         f"TEXT_EMBEDDER and IMAGE_EMBEDDER")
    matches = neuron_matches(a, b)
    ab = alignment_matrix(a.vectors, b.vectors)
    ba = alignment_matrix(b.vectors, a.vectors)
    la, lb = list(a.vectors), list(b.vectors)
    align = [{"layer_a": x, "layer_b": y, "a_to_b": round(float(ab[i, j]), 4),
              "b_to_a": round(float(ba[j, i]), 4)}
             for i, x in enumerate(la) for j, y in enumerate(lb)]
    concepts = concept_rows(a, b, kind, concept_threshold)
    scores = [dict(r, run=run.name) for run in (a, b) for r in run.scores]
    out.folder.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out.folder)  # what a killed earlier run left half-written
    retract_meta(out.meta)  # not done until the new meta is written
    plot_alignment(ab, ba, la, lb, (a.name, b.name), out.alignment_png)
    write_csv(out.matches, matches, columns(artefacts.MatchRow))
    write_csv(out.alignment, align, columns(artefacts.AlignmentRow))
    write_csv(out.concepts, concepts, columns(artefacts.ConceptMatchRow))
    write_csv(out.scores, scores, columns(artefacts.CompareScoreRow))
    text = report(a, b, matches, align, concepts, scores, concept_threshold, kind)
    write_text(out.report, text)
    # The two runs have lineages of their own (the same stage names): they are recorded side by
    # side, not merged.
    write_meta(out.meta, STAGE, dict(args or {}),
               outputs=[out.matches, out.alignment, out.concepts, out.scores],
               run_a=str(run_a), run_b=str(run_b), lineage_a=a.lineage,
               lineage_b=b.lineage, kind=kind,
               concept_threshold=concept_threshold)
    log.info("\n%s", text)
    return {"matches": matches, "alignment": align, "concepts": concepts, "scores": scores,
            "a_to_b": ab, "b_to_a": ba}


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags: ``--run``, ``--other`` and the fields of ``Settings``."""
    p = stage_parser(__doc__.split("\n\n")[0])
    add_run(p, "04_embeddings.npz, 03_descriptions.csv, 05_clusters.csv and 09_summary.csv of "
            "both runs", "12_compare__<other>/")
    p.add_argument("--other", required=True, type=Path, metavar="DIR",
                   help="folder of run B, compared with --run (make: data/<OTHER>/)")
    add_settings(p, Settings)
    return p


@exit_on_stage_error
def main(argv=None):
    """Parse flags and compare the two runs."""
    args = start_stage(build_parser(), argv)
    run(artefacts.Run(args.run), artefacts.Run(args.other), settings_from(Settings, args),
        args=vars(args))


if __name__ == "__main__":
    main()
