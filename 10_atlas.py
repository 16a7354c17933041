"""Stage 10 — the atlas: a static site of a whole run that opens from disk.

Reads (see ARTEFACTS.md) the run folder: 01_images.csv, 01_predictions.csv, 01_activations.npz and
01_extract.meta.json, 02_mosaics.csv, 03_descriptions.csv (required); 04_embeddings.npz,
05_clusters.csv / 05_keywords.csv / 05_metrics.csv / 05_categories.csv, 06_trace.csv, 08_confusion.csv
and 08_debug/ (with its attributions.npz), 09_scores.csv and 09_summary.csv (optional: a page says what is missing); and the
reports made on request — 11_baskets.csv / 11_pruning.csv, 13_audit/, 12_compare__<B>/ — each shown
only while the outputs it was made from are unchanged (its meta's lineage, B's for B).
Writes <run>/atlas/ (replaced as a whole, atomically) and <run>/10_atlas.meta.json:
  index.html              the run: model, images, accuracy, layers, describer, scores, links
  layers/<L>.html         every neuron of layer L as a card, sortable, filterable (data/<L>.js)
  maps/<L>.html           the layer's 2-D map from 05 (hover: sentence and mosaic; click: neuron)
  neurons/<L>/<c>.html    one neuron: mosaic, sentences, scores, classes of its top images,
                          similar neurons in its layer and the layers around it, debug reports
  sankey.html             06's trace with clickable clusters
  glossary.html           what every score means (common/glossary.py: the one copy of the texts
                          that headers, card chips and the sort menu show as tooltips)
  search.html             text filter over all sentences; by meaning / image when served by 07
  debug/                  08's reports, and per analysed pair a page per misclassified image
  baskets.html, audit/, compare/<B>.html   11's baskets, 13's audit, 12's comparison with run B
  assets/                 atlas.css, atlas.js, terms.js (tooltips), plotly.min.js (stored once)
  thumbs/, subs/          JPEG copies of the mosaics (cards, sub-concepts)
  images/<id>.webp        every image in a neuron's top k, as the network saw it: a neuron
                          page draws its mosaic's tiles from them at the images' own resolution,
                          and a click on a tile shows the whole image
  actmaps/<L>/<c>.webp    for layers whose maps 01 stored: the neuron's activation map on each
                          of its top images, in one grey strip (white: its top activation)
  mosaics/                WebP copies of the mosaics that cannot be drawn from images/ (CROP=mask)

Misclassified images: for the KO images of the pairs 08 analysed, 08 computed the relevance of each
neuron of each layer to the wrong class — activation × gradient of that class's logit at the
layer, summed over space (common/attribution.py): a first-order estimate of how much the logit
would drop with the neuron switched off. The atlas only renders it: it loads no model and never
imports torch to build.

The atlas opens from disk; `07_search.py --serve` (make serve) serves it over HTTP with the live
search its search page asks for.

Example:
  python 10_atlas.py --run data/demo                    # → data/demo/atlas/index.html
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import io
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.artefacts import Run, layer_slug, neuron_page, read_report_blocks
from common.fields import RF, tile_window
from common.attribution import ATTRIBUTION_NOTE
from common.cli import (StageError, add_run, add_settings, exit_on_stage_error, setting,
                        settings_from, stage_parser, start_stage)
from common.glossary import TERMS, glossary, term, trust_key, verdict
from common.io import replace_dir, sweep_temporaries, temp_dir
from common.processes import worker_pool
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta
from common.render import asset, fmt_number, json_for_script, render, report_paths

log = logging.getLogger("neuron-atlas.10_atlas")

STAGE = "10_atlas"
JPEG_QUALITY = 75  # thumbnails and mosaics: small files, crops still recognisable
# The top images the neuron pages draw their tiles from, at the network's input size: 1,496 of
# them in the demo, 8.6 MB as WebP at quality 70 (JPEG: 11.9 MB at 70, 10.3 MB at 60; measured on
# 80 of them; WebP costs ~16 ms an image where JPEG costs 1). They replace the 400-px WebP
# mosaics (16.4 MB), where 640-px WebP mosaics, at full resolution, would have cost 35 MB.
SOURCE_QUALITY = 70
# Activation maps: one grey WebP strip per neuron. Measured on the demo's 432 neurons with maps:
# 1.4 MB at quality 50, where coloured RGBA strips cost 4.8 MB (1.9 MB with a lossy alpha at 20).
MAP_QUALITY = 50
# Page-sized mosaics are most of the atlas's bytes: WebP at the same quality is about a sixth
# smaller than JPEG (measured on the demo's mosaics); encoder method 2 costs ~6 ms more per
# picture where the default (4) costs ~14 ms for 4 % fewer bytes.
PAGE_FORMAT = ("WEBP", ".webp")
WEBP_METHOD = 2
# Jobs from which 10 forks its workers: the break-even point measured with 640-px mosaics (8: 0.15 s
# alone or in 2 processes; 16: 0.30 s alone, 0.21 s in 2).
POOL_FROM = 8


@dataclass(frozen=True)
class Settings:
    """Stage 10's settings: one flag each, defaults written here only."""

    thumb_px: int = setting(160, "side of card / hover thumbnails (JPEG)")
    mosaic_px: int = setting(400, "side of the mosaic on neuron pages when 02 cut it with "
                             "CROP=mask (WebP; CROP=rf mosaics are drawn from the top images)")
    neighbours: int = setting(8, "similar neurons listed per layer on a neuron page")
    workers: int = setting(2, "processes making thumbnails", make="WORKERS")
CONTRIBUTORS = 5  # neurons listed per layer on a misclassified image's page
PAIR_TOP = 12  # neurons of all layers listed on a pair's page, by their mean share of the error
HEAT_COLOURS = 32  # colours of an activation map's PNG on a misclassified image's page
FAST_OCTREE = 2  # PIL's Image.Quantize.FASTOCTREE: the quantizer that keeps transparency
DEBUG_TOP = 20  # a neuron "appears in" a debug report when FDR-flagged or ranked this high
TOP_CLASSES = 8  # classes listed for a neuron's top images
LABELS_SHOWN = 12  # most frequent 15 labels listed per layer
KEY_SCORES = ["selectivity", "dnr_score", "clarity", "polysemanticity", "redundancy",
              "verify_corr", "margin"]  # shown on cards when 09 computed them
# 09's columns that differ between a neuron's sub-concepts (the others are the neuron's, shown once)
SUB_COLUMNS = ["share", "clarity", "verify_corr", "verify_auprc", "control_corr", "control_auprc",
               "margin", "n_held_out", "n_positives", "control_channel"]


# ----------------------------------------------------------------------------------------------
# Reading the run: the only place where 10 opens artefacts


@dataclass
class RunData:
    """Everything the atlas shows, read from one run folder (optional parts may be empty)."""

    run_dir: Path
    layers: list[str]
    topk: dict                      # layer → common.artefacts.LayerTopK
    input_size: tuple               # (height, width) of the network's input, from 01
    images: list[dict]              # 01_images.csv rows
    predictions: dict[int, dict]    # image id → 01_predictions.csv row
    extract_meta: dict
    mosaics: dict                   # (layer, channel) → 02_mosaics.csv's Mosaic row
    descriptions: dict              # (layer, channel) → 03 row
    embeddings: object = None       # common.artefacts.Embeddings of 04, or None
    cluster_kind: str | None = None
    clusters: dict = field(default_factory=dict)     # (layer, channel) → (cluster, x, y)
    keywords: dict = field(default_factory=dict)     # (layer, cluster; None: layer) → "a, b, c"
    metrics: dict = field(default_factory=dict)      # layer → 05 MetricRow of cluster_kind
    categories: dict = field(default_factory=dict)   # (layer, channel) → 05 CategoryRow
    map_methods: dict = field(default_factory=dict)  # layer → kind → "umap" / "pca" (05's meta)
    trace: list | None = None                        # 06 TraceLinks (both kinds)
    connections: object = None                       # 06's common.artefacts.Connections
    confusion: list[dict] | None = None
    pairs: list[dict] | None = None
    debug_neurons: dict = field(default_factory=dict)  # 08 folder → neurons.csv rows
    attributions: object = None                      # 08's common.artefacts.Attributions
    attribution_error: str = ""                      # why 08 computed none
    whys: dict = field(default_factory=dict)         # 08 folder → its why.npz (artefacts.Why)
    scores: list | None = None                       # 09 ScoreRows, sub-concepts included
    candidates: dict = field(default_factory=dict)   # (layer, channel) → 09 CandidateRows
    summary: list | None = None                      # 09 SummaryRows
    metas: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # what is missing, shown on the run page
    reports: list = field(default_factory=list)      # the on-request reports (Report), all kinds
    baskets: list = field(default_factory=list)      # 11 BasketRows (when current)
    pruning: list = field(default_factory=list)      # 11 PruningRows (Table 2)
    consistency: list = field(default_factory=list)  # 11 ConsistencyRows (Table 1)
    audit: list = field(default_factory=list)        # 13 AuditRows
    audit_summary: list = field(default_factory=list)  # 13 AuditSummaryRows
    labels: dict = field(default_factory=dict)       # (layer, channel) → 15 LabelRow
    label_concepts: list = field(default_factory=list)  # 15 LabelConceptRows
    audit_reliance: list = field(default_factory=list)  # 13 RelianceRows (the model test)
    compares: list = field(default_factory=list)     # one Comparison per current 12 folder


def read_run(run_dir: Path) -> RunData:
    """Read the artefacts of ``run_dir``; 01-03 are required, the later stages optional."""
    from common.artefacts import (read_activations, read_attributions, read_categories,
                                  read_clusters, read_confusion, read_debug_neurons,
                                  read_descriptions, read_embeddings, read_images, read_keywords,
                                  read_metrics, read_mosaics, read_pairs, read_predictions,
                                  read_candidates, read_connections, read_score_rows,
                                  read_summary, read_trace, read_why)
    from common.io import read_json

    files = Run(run_dir)

    def need(path: Path, stage: str) -> Path:
        """``path`` of a required artefact; a clear error when it is missing."""
        if not path.exists():
            raise StageError(f"{path} not found: run stage {stage} first (make all RUN=…)")
        return path

    activations = need(files.activations, "01")
    descriptions_csv = need(files.descriptions, "03")
    mosaics_csv = need(files.mosaics, "02")
    metas = [read_meta(activations), read_meta(mosaics_csv), read_meta(descriptions_csv)]
    layers, input_size, topk = read_activations(activations)
    # 01-04 through common/artefacts.py (typed rows, kept here as dicts for the templates).
    run = RunData(run_dir=run_dir, layers=layers, topk=topk, input_size=input_size,
                  images=[dataclasses.asdict(r) for r in read_images(need(files.images, "01"))],
                  predictions={r.image_id: dataclasses.asdict(r)
                               for r in read_predictions(need(files.predictions, "01"))},
                  extract_meta=metas[0],
                  mosaics={m.key: m for m in read_mosaics(mosaics_csv)},
                  descriptions={d.key: dataclasses.asdict(d)
                                for d in read_descriptions(descriptions_csv)})

    def optional(path: Path, what: str) -> Path | None:
        """``path`` of an optional artefact (its meta joins the lineage check), else None."""
        if path.exists():
            metas.append(read_meta(path))
            return path
        run.notes.append(f"{path.name} not found: {what} not shown.")
        return None

    if path := optional(files.embeddings, "similar neurons"):
        run.embeddings = read_embeddings(path)
    if path := optional(files.clusters, "clusters and 2-D maps"):
        rows = read_clusters(path)
        kinds = {r.kind for r in rows}
        trace_meta = files.meta("06_trace")
        wanted = read_json(trace_meta).get("args", {}).get("kind") if trace_meta.exists() else None
        run.cluster_kind = wanted if wanted in kinds else ("fused" if "fused" in kinds
                                                          else next(iter(sorted(kinds)), None))
        run.clusters = {(r.layer, r.channel): (r.cluster, r.x, r.y)
                        for r in rows if r.kind == run.cluster_kind}
        terms = collections.defaultdict(list)
        for r in read_keywords(files.keywords):
            if r.kind in (run.cluster_kind, "all"):
                terms[(r.layer, r.cluster)].append((r.rank, r.term))
        run.keywords = {k: ", ".join(t for _, t in sorted(v)[:4]) for k, v in terms.items()}
        run.metrics = {r.layer: r for r in read_metrics(files.metrics)
                       if r.kind == run.cluster_kind}
        if files.categories.exists():
            run.categories = {(r.layer, r.channel): r for r in read_categories(files.categories)}
        run.map_methods = read_meta(path).get("projection_used", {})
    if path := optional(files.trace, "the concept trace"):
        run.trace = read_trace(path)
        if files.connections.is_file():
            read_meta(files.connections)  # 06's, unchanged since
            run.connections = read_connections(files.connections)
    if path := optional(files.confusion, "debugging"):
        run.confusion = [{**dataclasses.asdict(r), "class": r.class_}
                         for r in read_confusion(path)]
        pairs_csv = files.pairs
        pairs = read_pairs(pairs_csv) if pairs_csv.exists() else []
        run.pairs = [{**dataclasses.asdict(p), "analysed": p.analysed} for p in pairs]
        for pair in pairs:
            neurons = files.pair(pair.folder).neurons
            if pair.analysed and neurons.exists():
                run.debug_neurons[pair.folder] = [dataclasses.asdict(r)
                                                  for r in read_debug_neurons(neurons)]
                why_path = files.pair(pair.folder).why
                if why_path.is_file():
                    read_meta(why_path, files.meta("08_debug"))  # 08's, unchanged since
                    run.whys[pair.folder] = read_why(why_path)
        meta08 = metas[-1]  # 08_confusion.csv's, read by ``optional``
        attributions = files.attributions
        if attributions.is_file():
            read_meta(attributions, files.meta("08_debug"))  # 08's, unchanged since
            run.attributions = read_attributions(attributions)
        run.attribution_error = meta08.get("attribution_error", "")
    if path := optional(files.scores, "scores"):
        run.scores = read_score_rows(path)
        if files.summary.exists():
            run.summary = read_summary(files.summary)
        for c in read_candidates(files.candidates, required=False):
            if c.subconcept is None:  # a neuron's own candidates (its page lists them)
                run.candidates.setdefault(c.key, []).append(c)
    run.metas = metas
    read_reports(run)
    return run


# ----------------------------------------------------------------------------------------------
# The reports made on request (make baskets / audit / compare): shown while they match the run


@dataclass
class Report:
    """One on-request report of the run and whether the atlas shows it."""

    kind: str                 # baskets, audit or compare
    title: str                # what the run page calls it
    nav: str                  # what the top bar calls it
    make: str                 # the command that makes or refreshes it
    state: str = "missing"    # current (shown), stale, unreadable or missing
    page: str = ""            # its page in the atlas when shown
    why: str = ""             # why it is not shown
    meta: dict | None = None  # its stage meta when current


@dataclass
class Comparison:
    """A current 12_compare__<other>/ folder: run A (this run) against ``other``."""

    other: str                # run B's folder name
    other_dir: Path
    meta: dict
    matches: dict             # (layer, channel) of A → its MatchRow
    back: collections.Counter  # (layer, channel) of A → how many of B's neurons match it best
    alignment: list           # AlignmentRows
    concepts: list            # ConceptMatchRows
    scores: list              # CompareScoreRows


def changed_since(lineage: dict, run_dir: Path) -> list[str]:
    """The stages of a report's ``lineage`` that have been run again in ``run_dir`` since: their
    meta there now holds another fingerprint (a stage without a meta there is not judged)."""
    from common.io import read_json
    out = []
    for stage, fingerprint in lineage.items():
        meta = Run(run_dir).meta(stage)
        if meta.is_file() and read_json(meta).get("fingerprint") != fingerprint:
            out.append(stage)
    return sorted(out)


def read_reports(run: RunData) -> None:
    """Read the on-request reports of the run (11's baskets, 13's audit, 12's comparisons).

    A report is shown only while it matches the run: when a stage it was made from has been
    run again since, or its files differ from what its meta lists, the run page says so and
    names the command that refreshes it, and no page shows its figures.
    """
    from common.artefacts import (read_alignment, read_audit, read_audit_summary, read_baskets,
                                  read_compare_scores, read_concept_matches, read_consistency,
                                  read_label_concepts, read_labels, read_matches, read_pruning,
                                  read_reliance)
    run_dir, name = run.run_dir, run.run_dir.name
    files = Run(run_dir)

    def check(report: Report, artefact: Path, sources: list[tuple[str, Path]],
              meta_file: Path | None = None) -> bool:
        """Read ``artefact``'s meta into ``report`` and judge it against the runs it came from:
        ``sources`` pairs the key of a lineage in the meta with the run folder it describes."""
        if not artefact.is_file():
            return False
        try:
            report.meta = read_meta(artefact, meta_file)
        except StageError as err:
            report.state, report.why = "unreadable", str(err)
            return False
        for key, folder in sources:
            if not folder.is_dir():
                report.state, report.why = "stale", f"{folder} is gone"
                return False
            if changed := changed_since(report.meta.get(key, {}), folder):
                report.state = "stale"
                report.why = (f"made from an earlier run of {', '.join(changed)}"
                              f"{'' if folder == run_dir else f' of {folder.name}'}")
                return False
        report.state = "current"
        return True

    baskets = Report("baskets", "Baskets of neurons that fire together (11)", "baskets",
                     f"make baskets RUN={name}")
    if check(baskets, files.baskets, [("lineage", run_dir)]):
        try:
            run.baskets = read_baskets(files.baskets)
            run.pruning = read_pruning(files.pruning)
            run.consistency = read_consistency(files.consistency)
            baskets.page = "baskets.html"
        except StageError as err:  # files of an older 11 (other columns)
            run.baskets, run.pruning, run.consistency = [], [], []
            baskets.state, baskets.why = "stale", f"made by an older 11_baskets: {err}"
    audit = Report("audit", "Audit of classes against valid and spurious concepts (13)", "audit",
                   f"make audit RUN={name} AUDIT=concepts.yaml")
    if check(audit, files.audit, [("lineage", run_dir)], files.audit_meta):
        run.audit = read_audit(files.audit)
        run.audit_summary = read_audit_summary(files.audit_summary)
        run.audit_reliance = read_reliance(files.audit_reliance, required=False)  # older 13: none
        audit.page = "audit/index.html"
    run.reports = [baskets, audit]
    if files.labels.exists() or files.meta("15_label").exists():  # none made: the atlas as before
        labels = Report("labels", "Labels: each neuron's best concept of a list (15)", "labels",
                        f"make label RUN={name}")
        run.reports.append(labels)
        if check(labels, files.labels, [("lineage", run_dir)], files.meta("15_label")):
            try:
                run.labels = {(r.layer, r.channel): r for r in read_labels(files.labels)}
                run.label_concepts = read_label_concepts(files.label_concepts)
                labels.page = "labels.html"
            except StageError as err:  # files of an older 15 (other columns)
                run.labels, run.label_concepts = {}, []
                labels.state, labels.why = "stale", f"made by an older 15_label: {err}"
    for folder in sorted(run_dir.glob("12_compare__*/")):
        other = folder.name.split("__", 1)[1]
        report = Report("compare", f"Comparison with run {other} (12)", f"vs {other}",
                        f"make compare RUN={name} OTHER={other}")
        run.reports.append(report)
        # 12 records the lineage of the 04, 05 and 09 outputs of each run: A's is judged
        # here, B's in B.
        made = files.comparison(other)
        if check(report, made.matches,
                 [("lineage_a", run_dir), ("lineage_b", run_dir.parent / other)]):
            rows = read_matches(made.matches)
            run.compares.append(Comparison(
                other=other, other_dir=run_dir.parent / other, meta=report.meta,
                matches={(r.layer, r.channel): r for r in rows if r.side == "A"},
                back=collections.Counter((r.match_layer, r.match_channel)
                                         for r in rows if r.side == "B"),
                alignment=read_alignment(made.alignment),
                concepts=read_concept_matches(made.concepts),
                scores=read_compare_scores(made.scores)))
            report.page = f"compare/{layer_slug(other)}.html"
    if not any(r.kind == "compare" for r in run.reports):
        run.reports.append(Report("compare", "Comparison with another run (12)", "",
                                  f"make compare RUN={name} OTHER=<another run>"))


# ----------------------------------------------------------------------------------------------
# Neurons: one record per neuron with everything its card, page and map point need


def number(text: str):
    """A CSV cell as a float, None when empty or not a number (NaN counts as missing)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) or math.isinf(value) else value


def score_tables(run: RunData) -> tuple[dict, dict]:
    """09's rows by neuron: (its scores, its sub-concepts in order, each a dict the pages fill
    with a thumbnail)."""
    main, subs = {}, collections.defaultdict(list)
    for row in run.scores or []:
        scores = row.numbers()
        if row.subconcept is None:
            main[row.key] = scores
        else:
            subs[row.key].append({"index": row.subconcept, "description": row.description,
                                  "mosaic": row.mosaic, "thumb": "", "share": scores["share"],
                                  "scores": scores})
    for rows in subs.values():
        rows.sort(key=lambda r: r["index"])
    return main, subs


def candidate_table(rows: list) -> tuple[list[dict], float | None]:
    """09's candidates of one neuron → (those the chosen sentence beat, best first, and the
    chosen one's selection score); scores NaN → None."""
    def score(c) -> float | None:
        """The candidate's selection score, None when it has none."""
        return None if math.isnan(c.selection_corr) else c.selection_corr
    chosen = [score(c) for c in rows if c.chosen]
    beaten = [{"description": c.description, "source": c.source, "iteration": c.iteration,
               "selection_corr": score(c)} for c in rows if not c.chosen]
    beaten.sort(key=lambda c: -math.inf if c["selection_corr"] is None else c["selection_corr"],
                reverse=True)
    return beaten, chosen[0] if chosen else None


def neuron_records(run: RunData) -> dict[str, list[dict]]:
    """Per layer, one record per channel (in channel order) with its text, cluster and scores.
    The text is 09's final sentence (the best of its candidates) when 09 chose one, else 03's."""
    main, subs = score_tables(run)
    final = {row.key: row for row in run.scores or [] if row.subconcept is None
             and row.description}
    out = {}
    for layer in run.layers:
        top = run.topk[layer]
        records = []
        for c in range(top.channels):
            key = (layer, c)
            desc = run.descriptions.get(key, {})
            cluster = run.clusters.get(key)

            values = top.values[c][top.image_ids[c] >= 0]
            first = desc.get("description", "") if desc.get("status") == "ok" else ""
            beaten, chosen_score = candidate_table(run.candidates.get(key, []))
            records.append({
                "layer": layer, "slug": layer_slug(layer), "channel": c,
                "description": final[key].description if key in final else first,
                "first_description": first, "candidates": beaten,
                "chosen_score": chosen_score,
                "status": desc.get("status", "missing"), "reason": desc.get("reason", ""),
                "level": desc.get("level", ""),
                "cluster": cluster[0] if cluster else None,
                "x": cluster[1] if cluster else None, "y": cluster[2] if cluster else None,
                "category": getattr(run.categories.get(key), "category", ""),
                "top_activation": float(values[0]) if len(values) else None,
                "last_activation": float(values[-1]) if len(values) else None,
                "scores": main.get(key, {}),
                "verdict": verdict(main.get(key, {})),
                "subs": subs.get(key, []),
                "label": run.labels.get(key),  # 15's LabelRow, None when not labelled by 15
                "debug_scores": {},  # filled by the debugging pages: 08's z, mean relevance
                "mosaic_png": getattr(run.mosaics.get(key), "path", None),
                "mosaic_row": run.mosaics.get(key),
                "tiles": None,  # what its page's mosaic and lightbox draw (Site.tiles)
                "url": neuron_page(layer, c),
            })
        out[layer] = records
    return out


def class_names(run: RunData) -> dict[int, str]:
    """Class index → the model's name for it: 01's class list (so that a label the model never
    predicts, such as a WordNet id mapped to its class, shows by name), else as predicted."""
    names = dict(enumerate(run.extract_meta.get("classes") or []))
    return {**names, **{int(r["pred_idx"]): r["pred_name"] for r in run.predictions.values()}}


def top_classes(run: RunData, names: dict[int, str], layer: str, channel: int) -> dict:
    """Label and prediction counts over a neuron's top images (unlabelled ones counted apart).

    A label is shown by the model's class name when it maps to a class (``label_idx`` ≥ 0),
    else as the dataset wrote it.
    """
    ids = [int(i) for i in run.topk[layer].image_ids[channel] if i >= 0]
    labels, preds, unlabelled = collections.Counter(), collections.Counter(), 0
    for i in ids:
        row = run.predictions.get(i)
        if row is None:
            continue
        idx = int(row["label_idx"])
        if idx >= 0 or row.get("label"):
            labels[names.get(idx, row["label"]) if idx >= 0 else row["label"]] += 1
        else:
            unlabelled += 1
        preds[row["pred_name"]] += 1
    return {"label_counts": labels.most_common(TOP_CLASSES),
            "pred_counts": preds.most_common(TOP_CLASSES), "unlabelled": unlabelled,
            "topk": len(ids)}


def neighbours(run: RunData, n_best: int) -> tuple[dict, str]:
    """``(layer, channel) → [(title, [(layer, channel, cosine)…])…]`` from 04's embeddings.

    Own layer first, then the layer before and the layer after (the trace at neuron level).
    04's fused vectors (description and mosaic); neurons without a row get nothing.
    """
    if run.embeddings is None:
        return {}, ""
    kind = "fused"
    vectors = run.embeddings.fused
    layer_of, channel_of = run.embeddings.layer, run.embeddings.channel
    rows = {layer: np.flatnonzero(layer_of == layer) for layer in run.layers}
    out: dict = collections.defaultdict(list)
    for i, layer in enumerate(run.layers):
        own = rows[layer]
        if not len(own):
            continue
        around = [("in this layer", layer)]
        if i > 0:
            around.append((f"in the layer before ({run.layers[i - 1]})", run.layers[i - 1]))
        if i + 1 < len(run.layers):
            around.append((f"in the layer after ({run.layers[i + 1]})", run.layers[i + 1]))
        for title, other in around:
            cand = rows[other]
            if not len(cand):
                continue
            sims = vectors[own] @ vectors[cand].T
            if other == layer:
                np.fill_diagonal(sims, -np.inf)  # a neuron is not its own neighbour
            k = min(n_best, len(cand) - (other == layer))
            if k <= 0:
                continue
            best = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            for r, row in enumerate(own):
                order = best[r][np.argsort(-sims[r, best[r]], kind="stable")]
                out[(layer, int(channel_of[row]))].append(
                    (title, [(other, int(channel_of[cand[j]]), float(sims[r, j])) for j in order]))
    return out, kind


def by_sentence(minis: list[dict]) -> tuple[list[dict], list[dict]]:
    """Neighbour tiles (``mini`` dicts, best first) split into those whose sentence no other
    tile shares, and one line per sentence shared by several: ``{"sentence", "neurons"}``, in the
    order of each sentence's best tile."""
    groups: dict[str, list[dict]] = {}
    for m in minis:
        groups.setdefault((m["description"] or "").strip(), []).append(m)
    singles = [m for m in minis if len(groups[(m["description"] or "").strip()]) == 1]
    shared = [{"sentence": text, "neurons": members} for text, members in groups.items()
              if len(members) > 1]
    return singles, shared


def connection_neighbours(run: RunData, n_best: int) -> dict:
    """``(layer, channel) → [(title, [(layer, channel, strength)…])…]``: a neuron's strongest
    inputs from the chosen layer before and outputs to the one after, by 06's connections."""
    wiring = run.connections
    if wiring is None or not wiring.layers:
        return {}
    out: dict = {}
    for k, layer in enumerate(wiring.layers):
        size = (wiring.to_next[layer].shape[0] if layer in wiring.to_next
                else wiring.to_next[wiring.layers[k - 1]].shape[1])
        for channel in range(size):
            near = wiring.strongest(layer, channel, n_best)
            groups = []
            if near["inputs"]:
                groups.append((f"inputs from the layer before ({wiring.layers[k - 1]})",
                               near["inputs"]))
            if near["outputs"]:
                groups.append((f"outputs to the layer after ({wiring.layers[k + 1]})",
                               near["outputs"]))
            out[(layer, channel)] = groups
    return out


# ----------------------------------------------------------------------------------------------
# Images: JPEG thumbnails and WebP page-sized mosaics, made in parallel


def shrink_image(job: tuple) -> str | None:
    """Write copies of one image at the requested sizes, JPEG or WebP by the destination's
    suffix; return an error text or None.

    ``job`` is ``(source, [(destination, side), …])``. A picture is decoded once and shrunk
    from the largest size down, so each smaller copy starts from an already reduced image.
    """
    from PIL import Image, UnidentifiedImageError
    source, targets = job
    try:
        with Image.open(source) as img:
            img.draft("RGB", (max(s for _, s in targets),) * 2)  # JPEG sources decode smaller
            picture = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        return f"{source}: {err}"
    for destination, side in sorted(targets, key=lambda t: -t[1]):
        picture.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
        buf = io.BytesIO()
        page = Path(destination).suffix == PAGE_FORMAT[1]
        if page:
            picture.save(buf, format=PAGE_FORMAT[0], quality=JPEG_QUALITY, method=WEBP_METHOD)
        else:
            picture.save(buf, format="JPEG", quality=JPEG_QUALITY)
        Path(destination).parent.mkdir(parents=True, exist_ok=True)
        Path(destination).write_bytes(buf.getvalue())
    return None


def source_picture(job: tuple) -> str | None:
    """Write one top image as the network saw it; return an error text or None.

    ``job`` is ``(source, side, destination)``: the image file, the network's input side and
    the WebP to write.
    """
    from common.images import BadImage, load_rgb, network_input
    source, side, destination = job
    try:
        img, _ = load_rgb(source)
    except BadImage as err:
        return f"{source}: {err.reason}"
    buf = io.BytesIO()
    network_input(img, side).save(buf, format=PAGE_FORMAT[0], quality=SOURCE_QUALITY,
                                  method=WEBP_METHOD)
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    Path(destination).write_bytes(buf.getvalue())
    return None


def make_images(jobs: list[tuple], workers: int, work=shrink_image,
                desc: str = "10 thumbnails") -> list[str]:
    """Run ``work`` (``shrink_image``, ``source_picture``, ``write_map_strip``) on every job
    (``workers`` processes); return the errors."""
    from tqdm import tqdm
    if workers <= 1 or len(jobs) < POOL_FROM:
        results = [work(j) for j in tqdm(jobs, desc=desc, unit="img")]
    else:
        with worker_pool(workers, desc) as pool:
            chunk = max(1, min(16, len(jobs) // (4 * workers)))  # every worker gets a share
            results = list(tqdm(pool.map(work, jobs, chunksize=chunk), total=len(jobs),
                                desc=desc, unit="img"))
    return [r for r in results if r]


def strip_columns(k: int, w: int) -> int:
    """Columns of a strip of ``k`` maps ``w`` cells wide (WebP's largest side is 16,383)."""
    return max(1, min(k, 16383 // w))


def map_strip(maps: np.ndarray, top: float) -> bytes:
    """A neuron's activation maps on its top images (k × h × w, best first) as one grey WebP:
    map i at column i % columns, row i // columns (``strip_columns``).

    A cell's grey level is its activation as a share of the neuron's ``top`` activation: white
    at the top, black at 0 and below. One scale for all maps, so a weaker image's map is
    darker, as its activation is lower. The lightbox multiplies the image by it.
    """
    from PIL import Image
    k, h, w = maps.shape
    level = np.nan_to_num(maps.astype(np.float32), nan=0.0)
    level = np.clip(level / top, 0.0, 1.0) if top > 0 else np.zeros_like(level)
    columns = strip_columns(k, w)
    rows = -(-k // columns)
    grid = np.zeros((rows * columns, h, w), np.float32)
    grid[:k] = level
    plane = grid.reshape(rows, columns, h, w).transpose(0, 2, 1, 3).reshape(rows * h, columns * w)
    buf = io.BytesIO()
    Image.fromarray(np.round(255 * plane).astype(np.uint8), "L").save(
        buf, format="WEBP", quality=MAP_QUALITY, method=WEBP_METHOD)
    return buf.getvalue()


def write_map_strip(job: tuple) -> None:
    """Write ``map_strip(maps, top)`` to ``destination``; ``job`` is ``(maps, top,
    destination)`` (for ``make_images``'s workers: 8 ms a neuron)."""
    maps, top, destination = job
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    Path(destination).write_bytes(map_strip(maps, top))


# ----------------------------------------------------------------------------------------------
# Debugging: relevance of each neuron to the wrong class of misclassified images


def analysed_pairs(run: RunData) -> list[dict]:
    """08's analysed pairs with the ids of the KO images 08 attributed (the lowest ids, at most
    its ``--attribute-images`` per pair) and how many KO images the pair has."""
    limit = run.attributions.max_images if run.attributions is not None else 0
    out = []
    for pair in run.pairs or []:
        if not pair["analysed"]:
            continue
        t, p = int(pair["true_idx"]), int(pair["pred_idx"])
        ko = sorted(i for i, r in run.predictions.items()
                    if int(r["label_idx"]) == t and int(r["pred_idx"]) == p)
        out.append({**pair, "ko_ids": ko[:limit], "ko_total": len(ko)})
    return out


def network_picture(run: RunData, image_id: int):
    """Image ``image_id`` as the network saw it (01's input size, RGB), or None if unreadable."""
    from common.images import BadImage, load_rgb, network_input
    try:
        img, _ = load_rgb(run.predictions[image_id]["path"])
    except BadImage as err:
        log.warning("image %d not shown: %s", image_id, err.reason)
        return None
    return network_input(img, int(run.extract_meta["preprocess"]["input_size"]))


# ----------------------------------------------------------------------------------------------
# The site


class Site:
    """Writes the atlas pages into a folder; holds what every page shares (nav, records)."""

    def __init__(self, run: RunData, out: Path, records: dict[str, list[dict]]):
        """Prepare the shared context (layer list for the navigation bar)."""
        self.run, self.out, self.records = run, out, records
        self.scored = run.scores is not None
        self.layer_info = [self._layer_info(name) for name in run.layers]
        slugs = collections.Counter(info["slug"] for info in self.layer_info)
        if clash := [name for name in run.layers if slugs[layer_slug(name)] > 1]:
            raise StageError(f"layers {clash} map to the same file name in the atlas; rename "
                             f"them, or choose other layers with LAYERS=…")
        for i, info in enumerate(self.layer_info):
            info["prev"] = self.layer_info[i - 1] if i > 0 else None
            info["next"] = self.layer_info[i + 1] if i + 1 < len(self.layer_info) else None
        self.site = {"run": run.run_dir.name, "layers": self.layer_info, "scored": self.scored,
                     "has_trace": bool(run.trace), "has_debug": run.confusion is not None,
                     "reports": [{"name": r.nav, "url": r.page}
                                 for r in run.reports if r.state == "current"]}
        self.by_key = {(r["layer"], r["channel"]): r for recs in records.values() for r in recs}
        self.basket_thumbs: dict[str, str] = {}  # basket → its JPEG (set by image_jobs)
        self.term_keys = set(TERMS)  # every column a page names: its tip goes to terms.js

    def _layer_info(self, name: str) -> dict:
        """Summary of one layer for the run page and the navigation."""
        recs = self.records[name]
        levels = collections.Counter(r["level"] for r in recs if r["level"])
        metric = self.run.metrics.get(name)
        method = self.run.map_methods.get(name, {}).get(self.run.cluster_kind, "")
        return {"name": name, "slug": layer_slug(name), "neurons": len(recs),
                "described": sum(r["status"] == "ok" for r in recs),
                "level": levels.most_common(1)[0][0] if levels else "–",
                "k": metric.k if metric else None,
                "silhouette": metric.silhouette if metric else None,
                "better": metric.better if metric else None,
                "keywords": self.run.keywords.get((name, None), ""),
                "wordcloud": (f"wordclouds/{layer_slug(name)}.png"
                              if self.wordcloud_png(name).exists() else ""),
                "has_map": any(r["x"] is not None for r in recs),
                "labels": self._layer_labels(name, recs),
                "map_note": f"2-D map ({method.upper() or '?'}) of the {self.run.cluster_kind} "
                            f"embeddings, from 05."}

    def _layer_labels(self, name: str, recs: list[dict]) -> dict | None:
        """15's labels of one layer: neurons labelled, the most frequent labels, the concepts no
        neuron of the layer encodes (None when 15 has not labelled the run)."""
        rows = [r for r in self.run.label_concepts if r.layer == name]
        if not rows:
            return None
        counts = sorted((r for r in rows if r.labelled), key=lambda r: -r.labelled)
        return {"labelled": sum(r["label"] is not None and bool(r["label"].labelled)
                                for r in recs),
                "scored": sum(r["label"] is not None for r in recs),
                "top": [(r.concept, r.labelled) for r in counts[:LABELS_SHOWN]],
                "missing": [r.concept for r in rows if r.missing], "concepts": len(rows)}

    def page(self, rel: str, template: str, **context) -> None:
        """Render ``template`` to ``rel`` (a path inside the atlas); links are made relative."""
        depth = rel.count("/")
        html = render(template, site=self.site, root="../" * depth, **context)
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(html, encoding="utf-8")

    # -- static parts ---------------------------------------------------------------------------

    def wordcloud_png(self, layer: str) -> Path:
        """05's word cloud of ``layer`` (it may be absent: 05 run with --no-plots)."""
        return self.run.run_dir / "05_plots" / f"{layer_slug(layer)}_wordcloud.png"

    def assets(self) -> None:
        """Stylesheet, script and plotly.js (from the plotly package: works offline), once;
        05's word clouds of the layers."""
        import plotly
        folder = self.out / "assets"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "atlas.css").write_bytes(asset("atlas.css"))
        (folder / "atlas.js").write_bytes(asset("atlas.js"))
        shutil.copyfile(Path(plotly.__file__).parent / "package_data" / "plotly.min.js",
                        folder / "plotly.min.js")
        for info in self.layer_info:
            if info["wordcloud"]:
                (self.out / "wordclouds").mkdir(exist_ok=True)
                shutil.copyfile(self.wordcloud_png(info["name"]), self.out / info["wordcloud"])

    def image_jobs(self, thumb_px: int, mosaic_px: int) -> list[tuple]:
        """Thumbnail / mosaic jobs for every neuron with a mosaic, and each sub-concept mosaic."""
        jobs = []
        for layer, recs in self.records.items():
            for r in recs:
                r["thumb"] = r["mosaic"] = ""
                png = r["mosaic_png"]
                if png is not None and Path(png).exists():
                    r["thumb"] = f"thumbs/{r['slug']}/{r['channel']}.jpg"
                    targets = [(str(self.out / r["thumb"]), thumb_px)]
                    if r["mosaic_row"].crop != "rf":  # not drawn from images/: a page copy
                        r["mosaic"] = f"mosaics/{r['slug']}/{r['channel']}{PAGE_FORMAT[1]}"
                        targets.append((str(self.out / r["mosaic"]), mosaic_px))
                    jobs.append((str(png), targets))
                for sub in r["subs"]:
                    source = self.run.run_dir / sub["mosaic"] if sub["mosaic"] else None
                    if source is not None and source.is_file():
                        sub["thumb"] = f"subs/{r['slug']}/{r['channel']}_{sub['index']}.jpg"
                        jobs.append((str(source), [(str(self.out / sub["thumb"]), thumb_px)]))
        for b in self.run.baskets:
            source = self.run.run_dir / b.mosaic
            if b.mosaic and source.is_file():
                self.basket_thumbs[b.basket] = f"baskets/{layer_slug(b.layer)}/b{b.number}.jpg"
                jobs.append((str(source), [(str(self.out / self.basket_thumbs[b.basket]),
                                            thumb_px)]))
        return jobs

    def tiled(self) -> list[dict]:
        """The records whose tiles the neuron pages show: those with a mosaic."""
        return [r for recs in self.records.values() for r in recs if r["mosaic_row"] is not None]

    def source_jobs(self) -> list[tuple]:
        """``source_picture`` jobs: every image in the tiles of a mosaic, once."""
        side = int(self.run.input_size[0])  # 01's inputs are square
        ids = set()
        for r in self.tiled():
            top = self.run.topk[r["layer"]]
            ids.update(int(i) for i in top.image_ids[r["channel"]][:r["mosaic_row"].n_tiles]
                       if i >= 0)
        return [(self.run.predictions[i]["path"], side,
                 str(self.out / "images" / f"{i}{PAGE_FORMAT[1]}"))
                for i in sorted(ids) if i in self.run.predictions]

    def tiles(self, workers: int) -> None:
        """Fill each record's ``tiles``: what its page's mosaic and lightbox draw (the images
        of its tiles, their activations and windows; its activation maps when 01 stored them),
        writing the maps' strips into actmaps/; and write data/images.js, the label and
        prediction of every image shown. An image without a copy in images/ (unreadable) gets
        id −1: its tile stays grey."""
        names = class_names(self.run)
        copied = {int(p.stem) for p in (self.out / "images").glob(f"*{PAGE_FORMAT[1]}")}
        height, width = self.run.input_size
        shown, strips = set(), []
        for r in self.tiled():
            row, top = r["mosaic_row"], self.run.topk[r["layer"]]
            rf = RF.from_array(top.rf)
            c, n = r["channel"], row.n_tiles
            tiles = []
            for i, v, y, x in zip(top.image_ids[c][:n], top.values[c][:n], top.y[c][:n],
                                  top.x[c][:n]):
                if i < 0:
                    break
                t, left, _, _ = tile_window(rf, int(y), int(x), height, width)
                tiles.append([int(i) if int(i) in copied else -1,
                              float(f"{float(v):.4g}"), t, left])
                shown.add(int(i))
            t, left, bottom, right = tile_window(rf, 0, 0, height, width)
            r["tiles"] = {"grid": row.grid, "tile": row.tile_px, "crop": row.crop,
                          "size": [height, width], "window": [bottom - t, right - left],
                          "tiles": tiles, "map": "", "map_cell": [], "map_columns": 0}
            if top.maps is not None and len(tiles):
                rel = f"actmaps/{r['slug']}/{c}.webp"
                strips.append((top.maps[c][:len(tiles)], float(top.values[c][0]),
                               str(self.out / rel)))
                r["tiles"].update(map=rel, map_cell=list(top.maps.shape[2:]),
                                  map_columns=strip_columns(len(tiles), top.maps.shape[3]))
        make_images(strips, workers, write_map_strip, "10 activation maps")
        info = {}
        for i in sorted(shown):
            p = self.run.predictions.get(i)
            if p is None:
                continue
            idx = int(p["label_idx"])
            label = names.get(idx, p["label"]) if idx >= 0 else p["label"]
            info[str(i)] = [label or "", p["pred_name"], number(p["prob"])]
        (self.out / "data").mkdir(parents=True, exist_ok=True)
        (self.out / "data" / "images.js").write_text(
            f"window.ATLAS_IMAGES = {json_for_script(info)};\n", encoding="utf-8")

    # -- data and pages -------------------------------------------------------------------------

    def layer_data(self, layer: str) -> dict:
        """The JSON the layer's card page, map and search read (one small object per neuron).

        Scored layers add two columns of their own: ``trust``, each neuron's rank in the trust
        order (common/glossary.py's ``trust_key``; the page's default order), and ``margin``, its
        verdict's margin over control; ``v`` is the verdict's level (r, w, c, n: reliable, weak,
        chance, none; "" when not scored).
        """
        recs = self.records[layer]
        trust = {}
        if self.scored:
            ranked = sorted(recs, key=lambda r: (*trust_key(r["scores"]), r["channel"]))
            trust = {r["channel"]: i + 1 for i, r in enumerate(ranked)}
        extra = {}
        for r in recs:
            v = r["verdict"] or {}
            margin = v.get("margin")
            label = r["label"]
            extra[r["channel"]] = {k: x for k, x in (
                ("trust", trust.get(r["channel"])),
                ("margin", None if margin is None else round(margin, 4)),
                ("label_score", None if label is None else label.score)) if x is not None}
        score_keys = {k for r in recs for k in r["scores"]}
        # Sort menu order: the trust order and the margin, the cards' key scores, the rest.
        columns = [k for k in ("trust", "margin") if any(k in e for e in extra.values())]
        has_labels = any("label_score" in e for e in extra.values())
        columns += [k for k in KEY_SCORES if k in score_keys]
        columns += sorted(score_keys - set(columns))
        columns += ["label_score"] if has_labels else []  # 15's score of the neuron's best concept
        # 08's z and the mean relevance per analysed pair come after 09's scores, in pair order.
        columns += list(dict.fromkeys(k for r in recs for k in r["debug_scores"]))
        sizes = collections.Counter(r["cluster"] for r in recs if r["cluster"] is not None)
        clusters = [{"id": c, "size": sizes[c], "keywords": self.run.keywords.get((layer, c), "")}
                    for c in sorted(sizes)]

        def short(v):
            """A coordinate or activation to 5 significant digits (the script of a 4,000-neuron
            layer stays small)."""
            return None if v is None else float(f"{v:.5g}")

        # Empty scores are left out of ``s``: the page reads a missing score as empty.
        neurons = [{"c": r["channel"], "d": r["description"], "cl": r["cluster"],
                    "x": short(r["x"]), "y": short(r["y"]), "a": short(r["top_activation"]),
                    "s": {k: x for k, x in {**r["scores"], **extra[r["channel"]],
                                            **r["debug_scores"]}.items() if x is not None},
                    "v": (r["verdict"] or {}).get("level", "")[:1],
                    "sub": [s["description"] for s in r["subs"] if s["description"]],
                    "t": r["thumb"], "u": r["url"], "dead": bool(r["scores"].get("dead")),
                    **({"lb": r["label"].label} if r["label"] is not None
                       and r["label"].labelled else {})}
                   for r in recs]
        named = ["channel", "top_activation", "cluster", *columns,
                 *(["concept_label"] if has_labels else [])]
        self.term_keys.update(named)
        return {"name": layer, "columns": columns, "clusters": clusters, "neurons": neurons,
                "key": [k for k in KEY_SCORES if k in columns],
                "terms": {k: {"n": t["name"], "s": t["short"], "t": t["tip"], "a": t["anchor"]}
                          for k in named for t in [term(k)]}}

    def layers(self) -> None:
        """Per layer: its data script, its card page and its map page."""
        for info in self.layer_info:
            data = self.layer_data(info["name"])
            script = (f"(window.ATLAS_DATA = window.ATLAS_DATA || {{}})"
                      f"[{json_for_script(info['name'])}] = {json_for_script(data)};\n")
            write_path = self.out / "data" / f"{info['slug']}.js"
            write_path.parent.mkdir(parents=True, exist_ok=True)
            write_path.write_text(script, encoding="utf-8")
            self.page(f"layers/{info['slug']}.html", "atlas_layer.html", layer=info)
            if info["has_map"]:
                self.page(f"maps/{info['slug']}.html", "atlas_map.html", layer=info)

    def neurons(self, similar: dict, similar_kind: str, debug: dict, contributions: dict,
                reports: dict, wired: dict | None = None) -> None:
        """One page per neuron; ``wired``: its neighbours by connection
        (``connection_neighbours``)."""
        wired = wired or {}
        from tqdm import tqdm
        by_key = {(r["layer"], r["channel"]): r for recs in self.records.values() for r in recs}

        def mini(layer: str, channel: int, **extra) -> dict:
            """What a small neuron tile links to and shows."""
            r = by_key[(layer, channel)]
            return {"layer": layer, "channel": channel, "url": r["url"], "thumb": r["thumb"],
                    "description": r["description"], **extra}

        def control_of(layer: str, channel: float | None) -> dict | None:
            """The control neuron 09 verified the sentence against (its tile), None if none."""
            if channel is None or (layer, int(channel)) not in by_key:
                return None
            return mini(layer, int(channel))

        def tiles(groups: list) -> list[dict]:
            """Neighbour groups as tiles, those sharing a sentence gathered on one line."""
            out = []
            for title, items in groups:
                singles, shared = by_sentence([mini(L, c, sim=v) for L, c, v in items
                                               if (L, c) in by_key])
                out.append({"title": title, "neurons": singles, "shared": shared})
            return out

        names = class_names(self.run)
        total = sum(len(v) for v in self.records.values())
        with tqdm(total=total, desc="10 neuron pages", unit="page") as bar:
            for layer, recs in self.records.items():
                for r in recs:
                    key = (layer, r["channel"])
                    original = ""  # named, not linked: the atlas links nothing outside itself
                    if r["mosaic_png"] is not None:
                        original = os.path.relpath(os.path.abspath(r["mosaic_png"]),
                                                   os.path.abspath(self.run.run_dir))
                    n = {**r, **top_classes(self.run, names, layer, r["channel"]),
                         "original": Path(original).as_posix() if original else "",
                         "describe_status": r["status"], "describe_reason": r["reason"],
                         "cluster_keywords": self.run.keywords.get((layer, r["cluster"]), "")
                         if r["cluster"] is not None else "",
                         "dead": bool(r["scores"].get("dead")),
                         "scores": [(term(k), v) for k, v in r["scores"].items()],
                         "verdict": r["verdict"],
                         "control": control_of(layer, r["scores"].get("control_channel")),
                         "subconcepts": r["subs"],
                         "sub_columns": [c for c in SUB_COLUMNS if r["subs"]
                                         and c in r["subs"][0]["scores"]],
                         "prev_channel": r["channel"] - 1 if r["channel"] > 0 else None,
                         "next_channel": r["channel"] + 1 if r["channel"] + 1 < len(recs) else None,
                         "neighbours": tiles(similar.get(key, [])),
                         "connected": tiles(wired.get(key, [])),
                         "neighbour_kind": similar_kind, "debug": debug.get(key, []),
                         "contributions": contributions.get(key, []),
                         "audit": [], "baskets": [], "matches": [], **reports.get(key, {})}
                    self.page(r["url"], "atlas_neuron.html", n=n, debug_top=DEBUG_TOP,
                              reports={r.kind: r for r in self.run.reports
                                       if r.state == "current"})
                    bar.update()

    def sankey(self) -> None:
        """The trace page: every cluster in its layer's column (depth order), linked by 06's
        sentence trace or by its connection trace (a switch on the page); bands as wide as the
        source cluster's neurons."""
        from common.trace import SIGNIFICANT_P, column_rows
        columns = [{"name": info["name"], "slug": info["slug"],
                    "clusters": self.layer_data(info["name"])["clusters"]}
                   for info in self.layer_info]
        shown = [c for c in columns if c["clusters"]]
        nodes, index = [], {}
        for col, layer in enumerate(shown):
            for c in layer["clusters"]:
                index[(layer["name"], c["id"])] = len(nodes)
                nodes.append({"layer": layer["name"], "slug": layer["slug"], "cluster": c["id"],
                              "size": c["size"], "col": col, "keywords": c["keywords"]})
        modes = {}
        for kind in ("sentence", "connection"):
            rows = [r for r in self.run.trace or [] if r.kind == kind
                    and (r.source_layer, r.source_cluster) in index
                    and (r.target_layer, r.target_cluster) in index]
            pairs = [((r.source_layer, r.source_cluster), (r.target_layer, r.target_cluster))
                     for r in rows]
            y = column_rows([[(L["name"], c["id"]) for c in L["clusters"]] for L in shown], pairs)
            modes[kind] = {"y": [y[(n["layer"], n["cluster"])] for n in nodes],
                           "links": [{"s": index[a], "t": index[b],
                                      "v": max(1, nodes[index[a]]["size"]),
                                      "sim": number(r.similarity), "p": number(r.p_value),
                                      "weak": bool(r.p_value > SIGNIFICANT_P)}
                                     for r, (a, b) in zip(rows, pairs)]}
        wiring = self.run.connections
        self.page("sankey.html", "atlas_sankey.html",
                  sankey={"nodes": nodes, "layers": [c["name"] for c in shown], "modes": modes},
                  clusters=columns, n_connection_images=wiring.n_images if wiring else 0,
                  has_connections=bool(wiring and wiring.layers), significant_p=SIGNIFICANT_P)

    def run_page(self) -> None:
        """index.html: what the run is and where everything is."""
        from common.artefacts import SummaryRow, columns
        run = self.run
        model = run.extract_meta.get("model") or {}
        ok = [r for r in run.images if r.get("status") == "ok"]
        labelled = [r for r in run.predictions.values() if int(r["label_idx"]) >= 0]
        correct = [r for r in labelled if r["correct"]]
        describers = collections.Counter(f"{r['backend']} ({r['model']})"
                                         for r in run.descriptions.values() if r.get("backend"))
        emb = run.embeddings
        embedder = (f"text {emb.text_model}, image {emb.image_model}, fused by {emb.fusion}"
                    if emb is not None else "not embedded (no 04)")
        matcher = "not scored"
        if run.summary:
            matcher = ", ".join(sorted({f"{r.matcher} (embedder {r.embedder})"
                                        for r in run.summary}))
        info = {"model": model.get("name", "?"), "weights": model.get("weights"),
                "random_init": model.get("random_init"),
                "input_size": model.get("input_size", "?"), "images": len(run.images),
                "ok": len(ok), "skipped": len(run.images) - len(ok), "labelled": len(labelled),
                "classes": len({r["label"] for r in labelled}),
                "accuracy": len(correct) / len(labelled) if labelled else None,
                "neurons": sum(len(v) for v in self.records.values()),
                "describer": "; ".join(f"{name}: {n} neurons"
                                       for name, n in describers.most_common()) or "?",
                "embedder": embedder, "matcher": matcher,
                "built": datetime.datetime.now().isoformat(timespec="seconds"),
                "lineage": merge_lineage(run.metas)}
        summary = None
        if run.summary:
            names = columns(SummaryRow)
            summary = {"columns": names,
                       "terms": [term("dead_neurons" if c == "dead" else c) for c in names],
                       "rows": [dataclasses.asdict(r) for r in run.summary]}
        categories = None
        if run.categories:
            names = sorted({r.category for r in run.categories.values()})
            rows = []
            for layer in run.layers:
                counts = collections.Counter(r.category for (L, _), r in run.categories.items()
                                             if L == layer)
                total = sum(counts.values())
                if total:
                    rows.append({"layer": layer,
                                 "shares": {c: counts[c] / total for c in names}})
            method = next(iter(run.categories.values())).method
            categories = {"names": names, "rows": rows, "method": method}
        self.page("index.html", "atlas_run.html", run=info, summary=summary,
                  categories=categories, problems=(run.confusion or [])[:10],
                  warnings=run.notes, reports=run.reports)

    # -- the on-request reports ------------------------------------------------------------------

    def neuron_link(self, layer: str, channel: int) -> dict:
        """A neuron of this run as the report pages show it (a link with thumbnail and text)."""
        r = self.by_key.get((layer, channel))
        if r is None:  # a report of a layer or channel the atlas does not have
            return {"layer": layer, "channel": channel, "url": "", "thumb": "", "description": ""}
        return {"layer": layer, "channel": channel, "url": r["url"], "thumb": r["thumb"],
                "description": r["description"]}

    def other_page(self, comparison: Comparison, target: str, page: str) -> str:
        """Link from ``page`` of this atlas to page ``target`` of run B's atlas, "" when B has no
        atlas or no such page."""
        path = Run(comparison.other_dir).atlas / target
        if not path.is_file():
            return ""
        here = Run(self.run.run_dir).atlas / Path(page).parent
        return Path(os.path.relpath(path, here)).as_posix()

    def report_pages(self) -> dict:
        """The pages of the current reports; returns ``(layer, channel) → {audit, baskets,
        matches}``: where each neuron appears in them, for its page."""
        out = collections.defaultdict(lambda: {"audit": [], "baskets": [], "matches": []})
        if self.run.baskets:
            self.baskets_page(out)
        if self.run.audit_summary:
            self.audit_pages(out)
        if self.run.label_concepts:
            self.labels_page()
        for comparison in self.run.compares:
            self.compare_page(comparison, out)
        return out

    def baskets_page(self, out: dict) -> None:
        """baskets.html: the run's Tables 1 and 2, then every basket of every layer with its
        members, name, sentence, mosaic and the classes it was pruned for; each member's page
        lists its basket."""
        run = self.run
        pruned = collections.defaultdict(list)
        for row in run.pruning:
            for name in row.pruned.split():
                pruned[name].append(row.class_name)
        layers = []
        for layer in run.layers:
            mine = [b for b in run.baskets if b.layer == layer]
            if not mine:
                continue
            rows = []
            for b in mine:
                anchor = f"b-{layer_slug(b.layer)}-{b.number}"
                # The full-size PNG (in the run folder) is named, not linked: the atlas links
                # nothing outside itself, and a page-sized copy of each would cost ~2 MB.
                rows.append({"row": b, "anchor": anchor,
                             "thumb": self.basket_thumbs.get(b.basket, ""),
                             "members": [self.neuron_link(layer, c) for c in b.members],
                             "pruning": pruned.get(b.basket, [])})
                for c in b.members:
                    out[(layer, c)]["baskets"].append(
                        {"basket": b.basket, "url": f"baskets.html#{anchor}", "size": b.size,
                         "cohesion": b.cohesion,
                         "description": " — ".join(t for t in (b.name, b.description) if t)})
            layers.append({"name": layer, "slug": layer_slug(layer), "baskets": rows,
                           "neurons": len(self.records[layer])})
        meta = next(r.meta for r in run.reports if r.kind == "baskets")
        self.page("baskets.html", "atlas_baskets.html", layers=layers, meta=meta,
                  total=len(run.baskets), members=sum(b.size for b in run.baskets),
                  consistency=run.consistency, pruning=run.pruning)

    def labels_page(self) -> None:
        """labels.html: per layer, how many neurons 15 labelled, their most frequent labels and
        the concepts no neuron of the layer encodes."""
        meta = next(r.meta for r in self.run.reports if r.kind == "labels")
        self.page("labels.html", "atlas_labels.html", layers=self.layer_info,
                  margin=meta.get("margin"), concepts=meta.get("concepts", ""),
                  vectors=meta.get("vectors", ""), n_concepts=meta.get("n_concepts"))

    def audit_pages(self, out: dict) -> None:
        """audit/index.html (every audited class, its figures and most relevant neurons) and a
        copy of 13's report of each class; each relevant neuron's page lists its classes."""
        from common.io import safe_name
        run = self.run
        classes = []
        for summary in run.audit_summary:
            folder = safe_name(summary.class_name, "class")  # as 13 names the class's folder
            source = run.run_dir / "13_audit" / folder / "report.html"
            report = ""
            if source.is_file():
                (self.out / "audit" / folder).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, self.out / "audit" / folder / "report.html")
                report = f"audit/{folder}/report.html"
            top = sorted((a for a in run.audit if a.class_name == summary.class_name
                          and a.rank <= summary.top and a.relevance > 0), key=lambda a: a.rank)
            for a in top:
                out[(a.layer, a.channel)]["audit"].append(
                    {"class_name": a.class_name, "rank": a.rank, "top": summary.top,
                     "relevance": a.relevance, "label": a.label,
                     "valid_alignment": a.valid_alignment, "valid_concept": a.valid_concept,
                     "spurious_alignment": a.spurious_alignment,
                     "spurious_concept": a.spurious_concept, "report": report,
                     "url": f"audit/index.html#{folder}"})
            classes.append({"row": summary, "anchor": folder, "report": report,
                            "neurons": [{**self.neuron_link(a.layer, a.channel), "audit": a}
                                        for a in top],
                            "reliance": [r for r in run.audit_reliance
                                         if r.class_name == summary.class_name]})
        meta = next(r.meta for r in run.reports if r.kind == "audit")
        self.page("audit/index.html", "atlas_audit.html", classes=classes,
                  margin=meta.get("margin"), concepts=meta.get("concepts", ""),
                  layer=meta.get("layer", ""), model_test=meta.get("model_test") or {})

    def compare_page(self, comparison: Comparison, out: dict) -> None:
        """compare/<other>.html: the layer alignment, concepts without a counterpart and 09's
        scores of both runs; each neuron's page gets its best match in the other run."""
        rel = f"compare/{layer_slug(comparison.other)}.html"
        for key, m in comparison.matches.items():
            target = f"neurons/{layer_slug(m.match_layer)}/{m.match_channel}.html"
            page = self.by_key[key]["url"] if key in self.by_key else target
            out[key]["matches"].append(
                {"other": comparison.other, "layer": m.match_layer, "channel": m.match_channel,
                 "cosine": m.cosine, "mutual": bool(m.mutual), "description": m.match_description,
                 "page": rel, "url": self.other_page(comparison, target, page),
                 "back": comparison.back.get(key, 0)})
        layers_a = list(dict.fromkeys(r.layer_a for r in comparison.alignment))
        layers_b = list(dict.fromkeys(r.layer_b for r in comparison.alignment))
        cell = {(r.layer_a, r.layer_b): r for r in comparison.alignment}
        matches = list(comparison.matches.values())
        concepts = []
        for r in comparison.concepts:
            if r.counterpart:
                continue
            url = f"../layers/{layer_slug(r.layer)}.html"  # from compare/
            if r.side == "B":
                url = self.other_page(comparison, f"layers/{layer_slug(r.layer)}.html", rel)
            concepts.append({"row": r, "url": f"{url}#cluster={r.cluster}" if url else ""})
        facts = {"neurons": len(matches), "mutual": sum(m.mutual for m in matches),
                 "mean": float(np.mean([m.cosine for m in matches])) if matches else None,
                 "kind": comparison.meta.get("kind", ""),
                 "threshold": comparison.meta.get("concept_threshold"),
                 "other_atlas": self.other_page(comparison, "index.html", rel), "png": ""}
        png = Run(self.run.run_dir).comparison(comparison.other).alignment_png
        if png.is_file():  # copied: the atlas links nothing outside itself but run B's atlas
            facts["png"] = f"{layer_slug(comparison.other)}_alignment.png"
            (self.out / "compare").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, self.out / "compare" / facts["png"])
        self.page(rel, "atlas_compare.html", other=comparison.other, facts=facts,
                  layers_a=layers_a, layers_b=layers_b, cell=cell, concepts=concepts,
                  concept_counts={side: (sum(r.side == side and not r.counterpart
                                             for r in comparison.concepts),
                                         sum(r.side == side for r in comparison.concepts))
                                  for side in ("A", "B")},
                  scores=comparison.scores)

    def terms_script(self) -> None:
        """assets/terms.js: the one-line tip of every score the pages name (``data-term``), for
        atlas.js to show as tooltips: written once instead of on every page."""
        from common.artefacts import SummaryRow, columns
        keys = self.term_keys | set(columns(SummaryRow)) | {f"mean_{k}" for k in TERMS}
        tips = {k: t["tip"] for k in sorted(keys) for t in [term(k)] if t["tip"]}
        (self.out / "assets" / "terms.js").write_text(
            f"window.ATLAS_TERMS = {json_for_script(tips)};\n", encoding="utf-8")

    def search(self) -> None:
        """search.html (it reads every layer's data script)."""
        self.page("search.html", "atlas_search.html")

    def glossary(self) -> None:
        """glossary.html: every score's plain name, meaning, range, reading and source paper."""
        self.page("glossary.html", "atlas_glossary.html", groups=glossary())

    def debug_pages(self, pairs: list[dict], method: str) -> dict:
        """debug/: index, per pair a page, the 08 report and one page per KO image 08 attributed
        (its relevances: ``method``; why it went wrong: 08's why.npz, neurons of all layers
        ranked together with their maps over the image).

        Returns ``(layer, channel) → [image contributions]`` for the neuron pages.
        """
        from common.attribution import WHY_NOTE, contribution_shares
        from common.images import heat_rgba
        run, by_key = self.run, {(r["layer"], r["channel"]): r
                                  for recs in self.records.values() for r in recs}
        contributions = collections.defaultdict(list)
        names = class_names(run)
        deep_first = list(reversed(run.layers))
        shown = []
        for pair in pairs:
            folder = pair["folder"]
            files = Run(run.run_dir).pair(folder)
            report = report_paths(files.folder)[1]
            out_dir = self.out / "debug" / folder
            out_dir.mkdir(parents=True, exist_ok=True)
            blocks = read_report_blocks(files.blocks)
            if blocks is not None:
                self.page(f"debug/{folder}/report.html", "atlas_report.html", pair=pair,
                          blocks=blocks, folder=files.folder)
            elif report.exists():
                shutil.copyfile(report, out_dir / "report.html")
            has_report = blocks is not None or report.exists()
            why = run.whys.get(folder)
            images, totals, shares = [], collections.defaultdict(lambda: 0.0), \
                collections.defaultdict(lambda: 0.0)
            attributed = {}
            for i in pair["ko_ids"]:
                att = run.attributions.of(i) if run.attributions is not None else None
                picture = network_picture(run, i) if att is not None else None
                if picture is not None:
                    picture.save(out_dir / f"{i}.jpg", format="JPEG", quality=85)
                    attributed[i] = att
            ids = list(attributed)
            for pos, i in enumerate(ids):
                att, pred = attributed[i], run.predictions[i]
                groups = []
                for layer in deep_first:
                    wrong, right = att["wrong"][layer], att["right"][layer]
                    positive = float(wrong[wrong > 0].sum())
                    top = np.argsort(-wrong, kind="stable")[:CONTRIBUTORS]
                    rows = []
                    for c in top:
                        r = by_key[(layer, int(c))]
                        rows.append({"channel": int(c), "url": r["url"], "thumb": r["thumb"],
                                     "description": r["description"], "wrong": float(wrong[c]),
                                     "right": float(right[c]),
                                     "share": float(wrong[c]) / positive if positive > 0 else None})
                        if wrong[c] > 0:
                            contributions[(layer, int(c))].append(
                                {"image_id": i, "relevance": float(wrong[c]),
                                 "url": f"debug/{folder}/{i}.html"})
                    for c in range(len(wrong)):
                        totals[(layer, c)] += float(wrong[c]) / len(ids)
                    groups.append({"layer": layer, "rows": rows})
                for layer, values in contribution_shares(att["wrong"], att["right"]).items():
                    for c, v in enumerate(values):
                        shares[(layer, c)] += float(v) / len(ids)
                ranked = []
                for k, r in enumerate(why.of(i) if why is not None else [], 1):
                    heat = f"{i}/{k}.png"
                    (out_dir / str(i)).mkdir(exist_ok=True)
                    # 32 colours with their transparency: a quarter of the bytes of RGBA
                    heat_rgba(r["map"]).quantize(colors=HEAT_COLOURS, method=FAST_OCTREE).save(
                        out_dir / heat, format="PNG", optimize=True)
                    rec = by_key[(r["layer"], r["channel"])]
                    ranked.append({**r, "rank": k, "heat": heat, "url": rec["url"],
                                   "thumb": rec["thumb"], "description": rec["description"],
                                   "peak": float(r["map"].max()),
                                   "lift": r["share"] * len(att["wrong"][r["layer"]])})
                top5 = zip(pred["top5_idx"], pred["top5_prob"])
                image = {"id": i, "label": pair["true"], "pred": pred["pred_name"],
                         "prob": number(pred["prob"]), "path": pred["path"],
                         "top5": ", ".join(f"{names.get(int(k), k)} ({100 * float(p):.1f}%)"
                                           for k, p in top5),
                         "logit_pred": att["logit_wrong"], "logit_true": att["logit_right"],
                         "prev": ids[pos - 1] if pos > 0 else None,
                         "next": ids[pos + 1] if pos + 1 < len(ids) else None,
                         "why": ranked}
                images.append(image)
                self.page(f"debug/{folder}/{i}.html", "atlas_image.html", image=image,
                          pair=pair, layers=groups, method=method, why_note=WHY_NOTE,
                          report=has_report)
            name = f"{pair['true']}→{pair['pred']}"
            for key, value in totals.items():
                by_key[key]["debug_scores"][f"relevance {name}"] = round(value, 5)
            for row in run.debug_neurons.get(folder, []):
                key = (row["layer"], int(row["channel"]))
                if key in by_key and number(row.get("mean_z")) is not None:
                    by_key[key]["debug_scores"][f"z {name}"] = round(number(row["mean_z"]), 4)
            # Neurons of all layers ranked together by their mean share of the error.
            ranked = sorted(((v, L, c) for (L, c), v in shares.items() if v > 0),
                            key=lambda t: (-t[0], deep_first.index(t[1]), t[2]))[:PAIR_TOP]
            top = [{**{k: by_key[(L, c)][k] for k in ("url", "thumb", "description")},
                    "layer": L, "channel": c, "value": v, "relevance": totals[(L, c)],
                    "lift": v * len(self.records[L])} for v, L, c in ranked]
            flagged = []
            for r in run.debug_neurons.get(folder, [])[:DEBUG_TOP]:
                rec = by_key.get((r["layer"], int(r["channel"])), {"url": "", "scores": {}})
                flagged.append({"rank": r["rank"], "layer": r["layer"],
                                "channel": int(r["channel"]), "url": rec["url"],
                                "z": number(r.get("mean_z")), "q": number(r.get("mean_q")),
                                "flagged": flag(r) or "no",
                                "flagged_z": flag(r, "flag_z") or "no",
                                "verify_corr": rec["scores"].get("verify_corr"),
                                "clarity": rec["scores"].get("clarity"),
                                "description": r.get("description", "")})
            note = run.attribution_error
            if pair["ko_ids"] and pair["ko_total"] > len(pair["ko_ids"]):
                note = (note + " " if note else "") + (f"Only the first {len(pair['ko_ids'])} of "
                                                       f"{pair['ko_total']} misclassified images "
                                                       f"have a page (--attribute-images).")
            self.page(f"debug/{folder}/index.html", "atlas_pair.html", pair=pair,
                      images=images, top=top if images else [], flagged=flagged,
                      report=has_report, method=method, why_note=WHY_NOTE,
                      attribution_note=note,
                      zmaps=z_maps(run.debug_neurons.get(folder, []), deep_first, by_key))
            shown.append({**pair, "page": True, "report": has_report})
        skipped = [p for p in run.pairs or [] if not p["analysed"]][:30]
        self.page("debug/index.html", "atlas_debug.html", pairs=shown, skipped=skipped)
        return contributions


def z_maps(neurons: list[dict], layers: list[str], by_key: dict) -> list[dict]:
    """08's z (mean aggregation) of every neuron of a pair as one grid per layer (``layers``
    order): cells in channel order with their colour (red: more active on the errors, blue:
    less; full colour at the pair's largest |z|, at least 2, the thesis's rule), their hover
    text and their neuron page."""
    z = {(r["layer"], int(r["channel"])): number(r.get("mean_z")) for r in neurons}
    full = max([2.0] + [abs(v) for v in z.values() if v is not None])  # |z| of full colour
    out = []
    for layer in layers:
        channels = sorted(c for L, c in z if L == layer)
        if not channels:
            continue
        cells = []
        for c in channels:
            value = z[(layer, c)]
            strength = 0.0 if value is None else min(abs(value) / full, 1.0)
            tint = round(255 * (1 - strength))
            colour = f"#ff{tint:02x}{tint:02x}" if (value or 0) > 0 else f"#{tint:02x}{tint:02x}ff"
            rec = by_key.get((layer, c), {})
            cells.append({"c": c, "z": value, "colour": colour, "url": rec.get("url", ""),
                          "title": f"{layer} · channel {c} · z = {fmt_number(value)}"})
        out.append({"layer": layer, "cells": cells, "full": full})
    return out


def flag(row: dict, column: str = "flag_fdr") -> str:
    """The aggregations ("max", "mean") by which 08 flagged the neuron ("" when none): by the FDR
    flag, or with ``column="flag_z"`` by the thesis's rule |z| ≥ 2."""
    return ", ".join(agg for agg in ("max", "mean")
                     if str(row.get(f"{agg}_{column}", "")).lower() in ("1", "true"))


def debug_appearances(run: RunData, pairs: list[dict]) -> dict:
    """``(layer, channel) → [pair rows]`` where 08 ranked the neuron high or flagged it."""
    out = collections.defaultdict(list)
    for pair in pairs:
        folder = pair["folder"]
        for row in run.debug_neurons.get(folder, []):
            rank = int(row["rank"])
            if rank <= DEBUG_TOP or flag(row):
                out[(row["layer"], int(row["channel"]))].append({
                    "folder": folder, "true": pair["true"], "pred": pair["pred"], "rank": rank,
                    "z": number(row.get("mean_z")), "q": number(row.get("mean_q")),
                    "flagged": flag(row) or "no", "flagged_z": flag(row, "flag_z") or "no",
                    "report": f"debug/{folder}/report.html"
                    if (run.run_dir / "08_debug" / folder / "report.html").exists() else ""})
    return out


# ----------------------------------------------------------------------------------------------
# Building


def build(run_dir: Path, settings: Settings = Settings(), out: Path | None = None,
          args: dict | None = None) -> Path:
    """Write the atlas of ``run_dir`` into ``out`` (default ``run_dir/atlas``); return index.html.

    The site is written into a temporary folder beside ``out`` and moved into place only when
    complete. The atlas only renders: the relevances of misclassified images' neurons are 08's
    (08_debug/attributions.npz), and no model is loaded here.
    """
    run_dir = Path(run_dir)
    out = Path(out or Run(run_dir).atlas)
    run = read_run(run_dir)
    merge_lineage(run.metas)  # refuse inputs that come from different runs
    records = neuron_records(run)
    meta_file = Run(run_dir).meta(STAGE)
    retract_meta(meta_file)  # until the new atlas is in place, stage 10 counts as not done
    sweep_temporaries(out.parent)  # what a killed earlier build left half-written
    for old in out.parent.glob(f".{out.name}.*"):  # named so before 10 used common.io's rule
        if re.fullmatch(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}", old.name) and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    tmp = temp_dir(out.parent, out.name)
    try:
        site = Site(run, tmp, records)
        site.assets()
        clock = time.perf_counter()
        jobs = site.image_jobs(settings.thumb_px, settings.mosaic_px)
        errors = make_images(jobs, settings.workers)
        for err in errors:
            log.warning("mosaic skipped: %s", err)
        log.info("10: %d mosaics shrunk in %.1f s", len(jobs), time.perf_counter() - clock)
        clock = time.perf_counter()
        sources = site.source_jobs()
        unread = make_images(sources, settings.workers, source_picture, "10 top images")
        if unread:
            log.warning("%d top images unreadable, their tiles stay grey (first: %s)",
                        len(unread), unread[0])
        site.tiles(settings.workers)
        log.info("10: %d top images copied, tiles and maps written in %.1f s", len(sources),
                 time.perf_counter() - clock)
        clock = time.perf_counter()
        pairs = analysed_pairs(run)
        similar, similar_kind = neighbours(run, settings.neighbours)
        contributions = {}
        if run.confusion is not None:
            contributions = site.debug_pages(pairs, ATTRIBUTION_NOTE)
        reports = site.report_pages()
        site.layers()
        site.neurons(similar, similar_kind, debug_appearances(run, pairs), contributions, reports,
                     wired=connection_neighbours(run, settings.neighbours))
        if run.trace:
            site.sankey()
        site.search()
        site.glossary()
        site.run_page()
        site.terms_script()
        log.info("10: pages written in %.1f s", time.perf_counter() - clock)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    shown = [r.meta for r in run.reports if r.state == "current"]
    write_meta(meta_file, STAGE, args or {}, outputs=files, inputs=run.metas + shown,
               mosaics_skipped=errors, reports=[{"kind": r.kind, "title": r.title, "state": r.state, "why": r.why}
                        for r in run.reports])
    size = sum(p.stat().st_size for p in files)
    log.info("10: atlas of %d neurons in %s (%.1f MB); open %s", sum(map(len, records.values())),
             out, size / 1e6, out / "index.html")
    return out / "index.html"


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of stage 10: ``--run``, ``--out`` and the fields of ``Settings``."""
    p = stage_parser(__doc__.split("\n")[0])
    add_run(p, "every stage's files (01–03 needed, the others shown when present)", "atlas/")
    p.add_argument("--out", type=Path, default=None, help="atlas folder (None: <run>/atlas)")
    add_settings(p, Settings)
    return p


@exit_on_stage_error
def main(argv=None):
    """Parse flags and build the atlas."""
    parser = build_parser()
    args = start_stage(parser, argv)
    if min(args.thumb_px, args.mosaic_px) < 1:
        parser.error("--thumb-px and --mosaic-px must be ≥ 1")
    build(args.run, settings_from(Settings, args), args.out, args=vars(args))


if __name__ == "__main__":
    main()
