"""Stage 13 — relevance and audit (SemanticLens): which neurons each class relies on, whether they
encode the concepts the user expects (valid) or ones it should not use (spurious), and what
happens to the class when the spurious ones are switched off.

Two steps, two commands:

  relevance   one extra pass over the labelled images of 01_predictions.csv: for each image, each
              neuron's activation × gradient of the image's true-class logit, summed over space
              (common/attribution.py), averaged over the class's images → 13_relevance.npz
              (per layer: classes × channels) and 13_relevance.meta.json.
  audit       reads 13_relevance.npz, 04_embeddings.npz (the neurons' text vectors: 03's sentence
              embedded by 04's text embedder), 03_descriptions.csv, 02_mosaics.csv and the user's
              concepts file (YAML: per class, valid and spurious concepts as text). Each neuron's
              alignment with a concept is cos(neuron, concept) − cos(neuron, empty text) (the
              empty-text baseline of SemanticLens); its alignment with a set is the best over the
              set. Labels: valid (valid alignment > margin, spurious not), spurious, both, or
              unexpected (neither). Writes into <run>/13_audit/: audit.csv (every neuron of
              the audited layer per class), summary.csv (per class), <class>/report.md and
              report.html, and 13_audit.meta.json.

The causal check zeroes the spurious-aligned (spurious or both) neurons among the class's --top
most relevant, re-runs the class's labelled images, and reports accuracy and confusions before and
after, beside random sets of the same size from the same layer (seeded).

The model test (SemanticLens's test on images of a spurious concept, and its correction): the run's
concept matcher (--matcher, as 09's verification) scores every usable image for each spurious
concept; a class's images in its top WITH_SHARE by that score show the concept, those in its
bottom WITHOUT_SHARE do not. The AUC of the class's logit separating the two groups (0.5: the concept
changes nothing) and the gap of their mean logits measure the class's reliance on the concept,
before and with the same neurons and random sets zeroed → 13_audit/reliance.csv.

Examples:
  python 13_audit.py relevance --run data/demo
  python 13_audit.py audit --run data/demo --audit examples/demo_audit.yaml
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
import logging
import re
from pathlib import Path

import numpy as np

from common.artefacts import AuditRow, AuditSummaryRow, RelianceRow, Run, columns
from common.cli import (ModelAgain, StageError, add_run, add_settings, escaped,
                        exit_on_stage_error, setting, settings_from, stage_parser, start_stage)
from common.concepts import best_alignment
from common.generation import GeneratorSettings
from common.io import load_npz, safe_name, save_npz, sweep_temporaries, write_csv
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta

log = logging.getLogger("neuron-atlas.13_audit")

LABELS = ("valid", "spurious", "both", "unexpected")


@dataclass(frozen=True)
class RelevanceSettings(ModelAgain):
    """``13_audit.py relevance``'s settings (and the model, named again)."""

    batch_size: int = setting(32, "images per pass", make="BATCH")
    device: str = setting("auto", "auto (cuda if present), cpu, cuda …", make="DEVICE")


WITH_SHARE = 0.25    # a class's image shows a concept when its matcher score is in the class's
                     # top quarter …
WITHOUT_SHARE = 0.5  # … and does not when in its bottom half (the quarter between is borderline)
MIN_IMAGES = 5       # fewer of a class's images on either side: no AUC ("too few images")
MARGIN = 0.2  # with 04's sentence embedder an unrelated concept still gains ~0.1 over the empty
              # text (demo: median 0.1, 90th percentile 0.2), so SemanticLens's 0 labels nearly
              # every neuron "both"; 0.2 keeps the labels for concepts the sentence is about


@dataclass(frozen=True)
class Settings(RelevanceSettings, GeneratorSettings):
    """``13_audit.py audit``'s settings: one flag each, defaults written here only (the images of
    a spurious concept for the model test: ``GeneratorSettings``)."""

    layer: str | None = setting(None, "layer audited (default: the deepest one)",
                                make="AUDIT_LAYER")
    top: int = setting(20, "most relevant neurons per class shown and checked", make="AUDIT_TOP")
    margin: float = setting(MARGIN, "alignment above which a neuron is labelled with a concept "
                            "(0: any gain over the empty text, as in SemanticLens)",
                            make="AUDIT_MARGIN")
    controls: int = setting(3, "random sets of the same size zeroed", make="CONTROLS")
    images_per_class: int = setting(40, "labelled images of a class re-run by the causal check",
                                    make="PRUNE_IMAGES")
    seed: int = setting(0, "seed of the image sample and controls")
    matcher: str = setting(
        "offline", "concept matcher that finds the images showing each spurious concept, as 09's "
        "--matcher (offline, clip or clip:<model>)", make="MATCHER")
    text_model: str = setting("all-MiniLM-L6-v2", "offline matcher: text embedder of concepts "
                              "and class names", make="TEXT_EMBEDDER")
    workers: int = setting(2, "offline matcher: processes measuring the images", make="WORKERS")


# ---------------------------------------------------------------------------------------------
# Relevance


def class_relevance(bundle, batches, layers: list[str], attribution=None
                    ) -> dict[str, np.ndarray]:
    """Per layer, classes × channels: each image's activation × gradient of its own class logit,
    summed over space, averaged over the images of each class. ``batches`` yields ``(ids, labels,
    tensor)`` (``common.rerun.image_batches``). Also ``classes`` (indices, ascending) and
    ``n_images`` per class."""
    from common.attribution import channel_attribution
    attribution = attribution or channel_attribution
    sums: dict[str, dict[int, np.ndarray]] = {layer: {} for layer in layers}
    counts: dict[int, int] = {}
    for _ids, labels, batch in batches:
        rel, _ = attribution(bundle.model, layers, batch, labels)
        for layer in layers:
            values = rel[layer].double().numpy()
            for k in np.unique(labels):
                total = values[labels == k].sum(axis=0)
                sums[layer][int(k)] = sums[layer].get(int(k), 0) + total
        for k in labels:
            counts[int(k)] = counts.get(int(k), 0) + 1
    if not counts:
        raise StageError("no labelled image of the run could be loaded: see the warnings above")
    classes = np.array(sorted(counts), dtype=np.int64)
    n_images = np.array([counts[k] for k in classes])
    out = {f"{layer}/relevance": (np.stack([sums[layer][k] for k in classes])
                                  / n_images[:, None]).astype(np.float32)
           for layer in layers}
    out.update(classes=classes, n_images=n_images, layers=np.array(layers))
    return out


def run_relevance(run: Run, settings: RelevanceSettings = RelevanceSettings(), bundle=None,
                  args: dict | None = None) -> dict[str, np.ndarray]:
    """Compute ``run``'s 13_relevance.npz (all labelled images, one pass). ``bundle`` replaces
    the model the settings name again — tests pass a small one."""
    from common.artefacts import read_layer_order, read_predictions
    from common.rerun import image_batches, labelled_rows, load_run_model
    out = run.relevance
    sweep_temporaries(run.folder)  # what a killed earlier run left half-written
    retract_meta(run.meta("13_relevance"))
    meta01 = read_meta(run.activations)
    layers = read_layer_order(run.activations)
    bundle = bundle or load_run_model(meta01, device=settings.device, **settings.model_again())
    # Class by class, as the classes' sums are kept (the order changes no sum beyond rounding).
    rows = sorted(labelled_rows(read_predictions(run.predictions)),
                  key=lambda r: r.label_idx)
    batches = image_batches(bundle, [(r.image_id, r.path, r.label_idx) for r in rows],
                            settings.batch_size, desc="13 relevance")
    arrays = class_relevance(bundle, batches, layers)
    save_npz(out, arrays)
    write_meta(run.meta("13_relevance"), "13_relevance", dict(args or {}),
               outputs=[out], inputs=[meta01], n_images=int(arrays["n_images"].sum()),
               attribution="activation x gradient of the true-class logit, summed over space")
    log.info("relevance of %d layers for %d classes from %d labelled images", len(layers),
             len(arrays["classes"]), int(arrays["n_images"].sum()))
    return arrays


# ---------------------------------------------------------------------------------------------
# Concepts and alignment


def read_concepts(path: Path) -> dict[str, dict[str, list[str]]]:
    """The user's concepts file: ``{class: {"valid": [...], "spurious": [...]}}``.

    Raises a StageError naming the problem for anything else (a class without concepts, a concept
    that is not text, an unknown key).
    """
    import yaml
    if not path.is_file():
        raise StageError(f"{path} not found: give a concepts file (AUDIT=…), e.g. "
                         f"examples/demo_audit.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise StageError(f"{path} is not valid YAML: {err}") from err
    classes = (data or {}).get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, dict) or not classes:
        raise StageError(f"{path} needs a top-level 'classes:' mapping of class → valid / "
                         f"spurious lists (see examples/demo_audit.yaml)")
    out = {}
    for name, spec in classes.items():
        if not isinstance(spec, dict) or set(spec) - {"valid", "spurious"}:
            raise StageError(f"{path}: class {name!r} must map to 'valid' and/or 'spurious' "
                             f"lists of concept texts")
        lists = {kind: spec.get(kind) or [] for kind in ("valid", "spurious")}
        for kind, items in lists.items():
            if not isinstance(items, list) or not all(isinstance(t, str) and t.strip()
                                                     for t in items):
                raise StageError(f"{path}: {name!r} → {kind} must be a list of non-empty texts")
        if not lists["valid"] and not lists["spurious"]:
            raise StageError(f"{path}: class {name!r} lists no concept")
        # Shown in reports and logs: control characters come out escaped (common.cli.escaped).
        out[escaped(name)] = {k: [escaped(t.strip()) for t in v] for k, v in lists.items()}
    return out


def label_of(valid: float, spurious: float, margin: float) -> str:
    """valid / spurious / both / unexpected from the two alignments and the margin."""
    v, s = valid > margin, spurious > margin
    return "both" if v and s else "valid" if v else "spurious" if s else "unexpected"


def resolve_classes(concepts: dict, predictions: list[dict], class_names: list[str] | None
                    ) -> dict[str, int]:
    """Each class of the concepts file → class index, matched against the dataset labels, the
    model's class names and plain indices (case and spacing ignored)."""
    def key(text) -> str:
        """Comparable form of a class name."""
        return re.sub(r"[\s_\-]+", " ", str(text).strip().lower())
    known: dict[str, int] = {}
    for r in predictions:
        if r.label_idx >= 0:
            known.setdefault(key(r.label), r.label_idx)
            known.setdefault(key(r.label_idx), r.label_idx)
    labelled = set(known.values())
    for i, name in enumerate(class_names or []):
        if i in labelled:
            known.setdefault(key(name), i)
    out = {}
    for name in concepts:
        if key(name) not in known:
            raise StageError(f"class {name!r} of the concepts file matches no labelled class "
                             f"(labels, model class names or indices of the labelled images: "
                             f"{sorted(k for k in known if not k.isdigit())[:12]})")
        out[name] = known[key(name)]
    return out


# ---------------------------------------------------------------------------------------------
# The model test: the class's reliance on a spurious concept


def concept_scores(match, concepts: list[str], table, input_size: int, layer: str,
                   geometry: tuple) -> dict[str, np.ndarray]:
    """Each concept's matcher score of every image of the run, by image id (NaN for an unusable
    or unreadable image): one pass of ``match`` (``common.verification.load_matcher``'s) over the
    run's usable images (``table``: ``common.verification.ImageTable``), with the windows of
    ``layer`` (``geometry``: its receptive field and feature-map (H, W)) for the offline one."""
    from tqdm import tqdm
    usable = np.flatnonzero(table.usable)
    with tqdm(total=len(usable), desc="13 concepts", unit="image", disable=None) as bar:
        def progress(items):
            """Advance the bar per image."""
            for item in items:
                yield item
                bar.update()
        scored = match.score({layer: list(concepts)}, [table.image_paths[i] for i in usable],
                             input_size, {layer: geometry}, progress)[layer]
    out = {}
    for j, concept in enumerate(concepts):
        column = np.full(len(table.image_paths), np.nan)
        column[usable] = scored[:, j]
        out[concept] = column
    return out


def concept_image_ids(scores: np.ndarray, class_ids: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The images of a class that show a concept and those that do not, as image ids among
    ``class_ids`` (the class's usable images); ``scores``: the concept's matcher score of every
    image of the run (``concept_scores``).

    Within the class (the matcher's scores have no zero that means "absent", and a concept common
    in the class, such as sky for a palace, would leave no run-wide "without" side): an image
    shows the concept when its score is in the class's top WITH_SHARE (and above the class's
    median, so that tied scores never count as showing it), and does not when it is below the
    class's WITHOUT_SHARE quantile. The one place that decides which images stand for a concept:
    images generated for it (SemanticLens's diffusion images, GENERATOR=diffusers) are to come in
    here."""
    class_ids = np.asarray(class_ids, np.int64)
    mine = scores[class_ids] if len(class_ids) else np.zeros(0)
    ok = np.isfinite(mine)
    if not ok.any():
        return class_ids[:0], class_ids[:0]
    high = np.quantile(mine[ok], 1 - WITH_SHARE)
    median = np.quantile(mine[ok], 0.5)
    low = np.quantile(mine[ok], WITHOUT_SHARE)
    return class_ids[ok & (mine >= high) & (mine > median)], class_ids[ok & (mine < low)]


def reliance(scores: np.ndarray, shows: np.ndarray) -> tuple[float, float]:
    """The class's reliance on a concept from its output ``scores`` on images that show the
    concept (``shows``) and images that do not: the AUC of the scores separating the two groups,
    images with the concept as positives (sklearn's ``roc_auc_score``; 0.5: the concept changes
    nothing, above: the class is scored higher with it), and the gap of the two groups' means."""
    from sklearn.metrics import roc_auc_score
    shows = np.asarray(shows, bool)
    return (float(roc_auc_score(shows, scores)),
            float(np.mean(scores[shows]) - np.mean(scores[~shows])))


def mean_sd(values: list[float]) -> tuple[float | str, float | str]:
    """Mean and standard deviation (rounded; empty without values)."""
    if not values:
        return "", ""
    return round(float(np.mean(values)), 4), round(float(np.std(values)), 4)


def reliance_rows(base: dict, concepts: list[str], found: dict[str, tuple], outputs: dict,
                  ids: list[int], n_zeroed: int, matcher: str) -> list[dict]:
    """reliance.csv's rows of one class: per spurious concept, its images with and without
    (``found``: concept → ``concept_image_ids``), and the reliance on it from the class's logit
    on the loaded images ``ids`` under each condition (``outputs``: ``before``, ``zeroed`` —
    None when nothing was zeroed — and ``controls``, a list), or why it was skipped."""
    rows = []
    where = {i: k for k, i in enumerate(ids)}
    for concept in concepts:
        pos, neg = found[concept]
        if min(len(pos), len(neg)) >= MIN_IMAGES:  # loaded: those that still load count
            pos = [where[i] for i in pos if i in where]
            neg = [where[i] for i in neg if i in where]
        row = {**base, "concept": concept, "matcher": matcher, "n_with": len(pos),
               "n_without": len(neg), "n_zeroed": n_zeroed, "status": "ok", "reason": ""}
        if min(len(pos), len(neg)) < MIN_IMAGES:
            row.update(status="skipped", reason=f"too few images: {len(pos)} with the concept, "
                       f"{len(neg)} without (at least {MIN_IMAGES} each)")
            rows.append(row)
            continue
        take = np.array(pos + neg)
        shows = np.arange(len(take)) < len(pos)

        def measure(logits):
            """AUC and gap of one condition's logits."""
            return reliance(logits[take], shows)
        row["auc_before"], row["gap_before"] = (round(v, 4) for v in measure(outputs["before"]))
        if outputs["zeroed"] is not None:
            row["auc_zeroed"], row["gap_zeroed"] = (round(v, 4)
                                                    for v in measure(outputs["zeroed"]))
            ctrl = [measure(o) for o in outputs["controls"]]
            row["auc_control"], row["auc_control_sd"] = mean_sd([a for a, _ in ctrl])
            row["gap_control"], row["gap_control_sd"] = mean_sd([g for _, g in ctrl])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Audit


def confusions(stats: dict, class_names, limit: int = 3) -> str:
    """The most frequent predictions of a class's images, as 'name n, name n'."""
    pairs = sorted(stats["predicted"].items(), key=lambda kv: -kv[1])[:limit]
    return ", ".join(f"{class_names[k] if class_names and k < len(class_names) else k} {n}"
                     for k, n in pairs)


def run_audit(run: Run, concepts_path: Path, settings: Settings = Settings(), text_embedder=None,
              bundle=None, args: dict | None = None, matcher_obj=None) -> dict:
    """Audit the classes of ``concepts_path`` on ``run``; write its 13_audit/ folder.

    ``text_embedder``, ``bundle`` and ``matcher_obj`` replace the 04 text embedder, the model and
    the concept matcher — tests pass small ones. Returns {"audit": rows, "summary": rows,
    "reliance": rows}.
    """
    from common.artefacts import (description_texts, read_activations, read_descriptions,
                                  read_embeddings, read_mosaics, read_predictions)
    from common.baskets import random_baskets
    from common.embedders import load_text_embedder
    from common.rerun import labelled_images, load_run_model, per_class as class_stats, predict
    from common.verification import load_matcher, read_image_table
    if settings.matcher != "offline" and settings.matcher.split(":")[0] != "clip":
        raise StageError(f"--matcher {settings.matcher!r}: use offline, clip or clip:<model>")
    layer, top, margin, controls = settings.layer, settings.top, settings.margin, settings.controls
    per_class, seed, batch_size = settings.images_per_class, settings.seed, settings.batch_size
    out_dir = run.audit_dir
    concepts = read_concepts(concepts_path)
    relevance_path = run.relevance
    if not relevance_path.is_file():
        raise StageError(f"{relevance_path} not found: compute it first (13_audit.py relevance, "
                         f"or make audit)")
    metas = [read_meta(run.activations), read_meta(relevance_path), read_meta(run.embeddings)]
    merge_lineage(metas)
    sweep_temporaries(out_dir)  # what a killed earlier run left half-written
    retract_meta(run.audit_meta)
    rel = load_npz(relevance_path)
    layers = [str(v) for v in rel["layers"]]
    emb = read_embeddings(run.embeddings)
    layer = layer or next((ly for ly in reversed(layers) if (emb.layer == ly).any()), None)
    if layer not in layers or not (emb.layer == layer).any():
        raise StageError(f"layer {layer!r} has no relevance or no embedded neurons; audited "
                         f"layers must be among {layers} and described by 03/04")
    rows = np.flatnonzero(emb.layer == layer)
    vectors = {int(c): emb.text[i] for c, i in zip(emb.channel[rows], rows)}
    sentences = description_texts(read_descriptions(run.descriptions))
    mosaics = {m.key: m.path for m in read_mosaics(run.mosaics, required=False)}
    embedder = text_embedder or load_text_embedder(emb.text_model, device=settings.device)
    predictions = read_predictions(run.predictions)
    bundle = bundle or load_run_model(metas[0], device=settings.device, **settings.model_again())
    class_idx = resolve_classes(concepts, predictions, bundle.class_names)
    matrix = rel[f"{layer}/relevance"]
    n_channels = matrix.shape[1]
    channels = np.array(sorted(vectors))
    empty = embedder.encode([""])[0]
    images = labelled_images(predictions, bundle, per_class, seed)
    # The model test: one pass of the concept matcher over the run's images for every spurious
    # concept of the audited classes.
    table = read_image_table(run)
    spurious = list(dict.fromkeys(t for name in class_idx for t in concepts[name]["spurious"]))
    found_scores, matcher_name = {}, ""
    if spurious:
        _, input_size, tops = read_activations(run.activations)
        match = matcher_obj or load_matcher(settings.matcher, table, settings.text_model,
                                            settings.device, settings.workers)
        matcher_name = match.name
        geometry = (tops[layer].rf, (int(tops[layer].fmap[1]), int(tops[layer].fmap[2])))
        found_scores = concept_scores(match, spurious, table, int(input_size[0]), layer,
                                      geometry)
    rendered: dict[str, list] = {}  # GENERATOR=diffusers: the images of each spurious concept
    if spurious and settings.generator == "diffusers":
        rendered = settings.renderer(settings.device).render(spurious, settings.generate_n,
                                                             settings.seed)
    audit_rows, summary, reliance_all = [], [], []
    for name, idx in class_idx.items():
        where = np.flatnonzero(rel["classes"] == idx)
        if not len(where):
            log.warning("class %s has no relevance (no labelled image of it in the run)", name)
            continue
        r = matrix[where[0]].astype(np.float64)
        texts = concepts[name]
        stacked = np.stack([vectors[c] for c in channels])
        valid = best_alignment(stacked, embedder.encode(texts["valid"]) if texts["valid"] else [],
                               empty)
        spur = best_alignment(stacked,
                              embedder.encode(texts["spurious"]) if texts["spurious"] else [],
                              empty)
        a_valid, i_valid, a_spur, i_spur = valid.score, valid.index, spur.score, spur.index
        label = {int(c): label_of(a_valid[k], a_spur[k], margin) for k, c in enumerate(channels)}
        pos = np.clip(r, 0, None)
        total = pos.sum() or 1.0

        def share(kinds) -> float:
            """Share of the class's positive relevance carried by neurons of these labels."""
            return float(sum(pos[c] for c in range(n_channels) if label.get(c) in kinds) / total)

        order = [int(c) for c in np.argsort(-r, kind="stable") if r[c] > 0][:top]
        rank = {c: i + 1 for i, c in enumerate(np.argsort(-r, kind="stable"))}
        for k, c in enumerate(channels):
            c = int(c)
            audit_rows.append({
                "class_name": name, "class_idx": idx, "layer": layer, "channel": c,
                "relevance": round(float(r[c]), 6), "rank": rank[c], "label": label[c],
                "valid_alignment": round(float(a_valid[k]), 4) if np.isfinite(a_valid[k]) else "",
                "valid_concept": texts["valid"][i_valid[k]] if i_valid[k] >= 0 else "",
                "spurious_alignment": round(float(a_spur[k]), 4) if np.isfinite(a_spur[k]) else "",
                "spurious_concept": texts["spurious"][i_spur[k]] if i_spur[k] >= 0 else "",
                "description": sentences.get((layer, c), "")})
        counts = {kind: sum(label.get(c) == kind for c in order) for kind in LABELS}
        zeroed = [c for c in order if label.get(c) in ("spurious", "both")]
        mine = images.labels == idx
        sets = random_baskets(n_channels, len(zeroed), controls, seed, exclude=zeroed) \
            if zeroed else []
        row = {"class_name": name, "class_idx": idx, "layer": layer,
               "n_images": int(rel["n_images"][where[0]]), "top": len(order),
               **{f"n_{k}": v for k, v in counts.items()},
               "n_undescribed": sum(c not in label for c in order),
               "spurious_share": round(share({"spurious", "both"}), 4),
               "valid_share": round(share({"valid", "both"}), 4),
               "unexpected_share": round(share({"unexpected"}), 4),
               "zeroed": " ".join(map(str, zeroed))}
        if mine.any():
            subset = images.select(mine)
            before = class_stats(predict(bundle, subset, None, batch_size), subset.labels)[idx]
            row.update(accuracy_before=round(before["accuracy"], 4),
                       confusions_before=confusions(before, bundle.class_names))
            if zeroed:
                after = class_stats(predict(bundle, subset, {layer: zeroed}, batch_size),
                                    subset.labels)[idx]
                ctrl = [class_stats(predict(bundle, subset, {layer: s}, batch_size),
                                    subset.labels)[idx] for s in sets]
                spread = mean_sd([c["accuracy"] for c in ctrl])
                row.update(accuracy_zeroed=round(after["accuracy"], 4),
                           confusions_zeroed=confusions(after, bundle.class_names),
                           accuracy_control=spread[0], accuracy_control_sd=spread[1],
                           confusions_control=confusions(ctrl[0], bundle.class_names) if ctrl else "",
                           controls=" ".join(",".join(map(str, s)) for s in sets))
        summary.append(row)
        mine_rel = class_reliance(
            {"class_name": name, "class_idx": idx, "layer": layer}, texts["spurious"],
            found_scores, table, predictions, bundle, idx, layer, zeroed, sets, batch_size,
            matcher_name, rendered)
        reliance_all += mine_rel
        write_reports(out_dir, row, [a for a in audit_rows if a["class_name"] == name],
                      order, mosaics, concepts[name], margin, mine_rel)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(run.audit, audit_rows, columns(AuditRow))
    write_csv(run.audit_summary, summary, columns(AuditSummaryRow))
    write_csv(run.audit_reliance, reliance_all, columns(RelianceRow))
    write_meta(run.audit_meta, "13_audit", dict(args or {}),
               outputs=[run.audit, run.audit_summary, run.audit_reliance], inputs=metas,
               layer=layer, margin=margin, text_model=getattr(embedder, "name", ""),
               concepts=str(concepts_path),
               model_test={"matcher": matcher_name, "with_share": WITH_SHARE,
                           "without_share": WITHOUT_SHARE, "min_images": MIN_IMAGES,
                           "score": "the class's logit",
                           "with_images": settings.described() if rendered else "retrieved"})
    for row in summary:
        log.info("%s: spurious share %.3f of the positive relevance; zeroing %d spurious-aligned "
                 "neurons: accuracy %s → %s (random control %s)", row["class_name"],
                 row["spurious_share"], len(row["zeroed"].split()), row.get("accuracy_before"),
                 row.get("accuracy_zeroed", "-"), row.get("accuracy_control", "-"))
    for r in reliance_all:
        if r["status"] == "ok":
            log.info("%s, %s (%d with, %d without): AUC %s → %s zeroed (random %s ± %s)",
                     r["class_name"], r["concept"], r["n_with"], r["n_without"], r["auc_before"],
                     r.get("auc_zeroed", "-"), r.get("auc_control", "-"),
                     r.get("auc_control_sd", "-"))
        else:
            log.info("%s, %s: skipped (%s)", r["class_name"], r["concept"], r["reason"])
    return {"audit": audit_rows, "summary": summary, "reliance": reliance_all}


def class_reliance(base: dict, texts: list[str], found_scores: dict, table, predictions: list,
                   bundle, idx: int, layer: str, zeroed: list[int], sets: list[list[int]],
                   batch_size: int, matcher: str, rendered: dict | None = None) -> list[dict]:
    """reliance.csv's rows of class ``idx``: its usable labelled images are split per spurious
    concept (``concept_image_ids``), those of any concept with enough on both sides are loaded
    once, and the class's logit is computed before, with ``zeroed`` zeroed, and with each random
    set of ``sets`` zeroed (``common.rerun.predict``, ``common.hooks.ablate_channels``).

    ``rendered`` (GENERATOR=diffusers: concept → PIL images made for it, as SemanticLens does)
    takes the place of the images with the concept; those without it stay the class's own."""
    import torch
    from common.generation import model_inputs
    from common.rerun import Images, load_images, predict
    class_ids = np.array(sorted(r.image_id for r in predictions
                                if r.label_idx == idx and table.usable[r.image_id]), np.int64)
    found = {t: concept_image_ids(found_scores[t], class_ids) for t in texts}
    made: list = []  # rendered images, given the ids −1, −2, … in this order
    for t in texts if rendered else ():
        first = len(made)
        made += rendered.get(t, [])
        found[t] = (-1 - np.arange(first, len(made)), found[t][1])
    wanted = sorted({int(i) for w, wo in found.values() if min(len(w), len(wo)) >= MIN_IMAGES
                     for i in (*w, *wo) if i >= 0})
    outputs = {"before": None, "zeroed": None, "controls": []}
    ids: list[int] = []
    if wanted or made:
        loaded = load_images(bundle, [(i, table.image_paths[i], idx) for i in wanted], {},
                             desc="load images of the concepts")
        if made:
            tensors = model_inputs(bundle, made)
            loaded = Images(ids=loaded.ids + [-1 - k for k in range(len(made))],
                            labels=np.concatenate([loaded.labels, np.full(len(made), idx)]),
                            tensors=torch.cat([loaded.tensors.reshape(-1, *tensors.shape[1:]),
                                               tensors]),
                            class_names={})
        ids = loaded.ids

        def logits(ablation):
            """The class's logit on the loaded images, with ``ablation`` zeroed."""
            return predict(bundle, loaded, ablation, batch_size, logits=True)[:, idx]
        outputs["before"] = logits(None)
        if zeroed:
            outputs["zeroed"] = logits({layer: zeroed})
            outputs["controls"] = [logits({layer: s}) for s in sets]
    return reliance_rows(base, texts, found, outputs, ids, len(zeroed),
                         f"{matcher}, with: rendered" if made else matcher)


def write_reports(out_dir: Path, row: dict, neurons: list[dict], order: list[int],
                  mosaics: dict, concepts: dict, margin: float, reliance: list[dict]) -> None:
    """report.md and report.html of one class (common/render.py): figures, the reliance on each
    spurious concept, then the most relevant neurons with label, sentence and mosaic. Sentences
    and concepts are untrusted text: the templates escape them."""
    from common import render as doc
    folder = out_dir / safe_name(row["class_name"], "class")
    folder.mkdir(parents=True, exist_ok=True)
    by_channel = {n["channel"]: n for n in neurons}
    top = [by_channel[c] for c in order if c in by_channel]
    facts = [
        ("images of the class", row["n_images"]), ("layer", row["layer"]),
        ("valid concepts", "; ".join(concepts["valid"]) or "(none)"),
        ("spurious concepts", "; ".join(concepts["spurious"]) or "(none)"),
        ("share of positive relevance on spurious-aligned neurons", row["spurious_share"]),
        ("… on valid-aligned neurons", row["valid_share"]),
        ("… on neurons aligned with neither (unexpected)", row["unexpected_share"]),
        (f"labels of the top {row['top']} neurons",
         ", ".join(f"{k} {row[f'n_{k}']}" for k in LABELS)),
        ("accuracy before", row.get("accuracy_before", "")),
        ("confusions before", row.get("confusions_before", "")),
        ("spurious-aligned relevant neurons zeroed", row["zeroed"] or "none (no causal check)"),
        ("accuracy with them zeroed", row.get("accuracy_zeroed", "")),
        ("confusions with them zeroed", row.get("confusions_zeroed", "")),
        ("accuracy with random sets of the same size zeroed (mean ± std)",
         pm(row.get("accuracy_control", ""), row.get("accuracy_control_sd", ""))),
    ]
    reliance_rows_shown = [{
        "spurious concept": r["concept"], "images with": r["n_with"],
        "images without": r["n_without"],
        "AUC before": r.get("auc_before", ""), "AUC zeroed": r.get("auc_zeroed", ""),
        "AUC random (mean ± std)": pm(r.get("auc_control", ""), r.get("auc_control_sd", "")),
        "gap before": r.get("gap_before", ""), "gap zeroed": r.get("gap_zeroed", ""),
        "gap random (mean ± std)": pm(r.get("gap_control", ""), r.get("gap_control_sd", "")),
        "note": r["reason"]} for r in reliance]
    columns = ["rank", "channel", "mosaic", "label", "description", "relevance",
               "valid_alignment", "valid_concept", "spurious_alignment", "spurious_concept"]
    neuron_rows = [dict(n, mosaic=mosaics.get((n["layer"], n["channel"]))) for n in top]
    doc.write_report(folder, f"Audit: {row['class_name']}", [
        doc.heading(f"Audit of class {row['class_name']}", 1),
        doc.paragraph(f"Alignment = cos(neuron, concept) − cos(neuron, empty text); a label needs "
                      f"more than {margin}."),
        doc.table(["fact", "value"], [{"fact": k, "value": v} for k, v in facts]),
        doc.heading("Reliance on the spurious concepts"),
        doc.paragraph(f"The class's images that the concept matcher finds showing each spurious "
                      f"concept (the class's top {WITH_SHARE:.0%} by its score) against those that "
                      f"do not (the class's bottom {WITHOUT_SHARE:.0%}): AUC of the class's logit "
                      f"separating them (0.5: the concept changes nothing; above: the class is "
                      f"scored higher with it) and the gap of their mean logits, before and with "
                      f"the zeroed neurons or random sets of the same size zeroed."),
        doc.table(list(reliance_rows_shown[0]) if reliance_rows_shown else ["spurious concept"],
                  reliance_rows_shown,
                  numeric=["images with", "images without", "AUC before", "AUC zeroed",
                           "gap before", "gap zeroed"]),
        doc.heading("Most relevant neurons"),
        doc.table(columns, neuron_rows, image="mosaic", thumb_px=160,
                  numeric=["rank", "channel", "relevance", "valid_alignment",
                           "spurious_alignment"])])


def pm(mean, sd) -> str:
    """'mean ± sd', or empty when not measured."""
    return f"{mean} ± {sd}" if mean != "" else ""


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags: per command ``--run`` and the fields of its settings."""
    p = stage_parser(__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("relevance", help="per-class relevance of every neuron (one pass)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = sub.add_parser("audit", help="audit classes against a concepts file",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run(r, "01_predictions.csv, 01_activations.npz and 01's images",
            "13_relevance.npz")
    add_settings(r, RelevanceSettings)
    add_run(a, "13_relevance.npz, 04_embeddings.npz, 03_descriptions.csv and 02_mosaics.csv",
            "13_audit/")
    a.add_argument("--audit", required=True, type=Path, help="concepts file (YAML)")
    add_settings(a, Settings)
    return p


@exit_on_stage_error
def main(argv=None):
    """Compute the relevance, or audit the classes."""
    args = start_stage(build_parser(), argv, keep_memory=True)
    if args.command == "relevance":
        run_relevance(Run(args.run), settings_from(RelevanceSettings, args), args=vars(args))
        return
    run_audit(Run(args.run), args.audit, settings_from(Settings, args), args=vars(args))


if __name__ == "__main__":
    main()
