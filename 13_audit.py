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

from common.artefacts import AuditRow, AuditSummaryRow, Run, columns
from common.cli import (ModelAgain, StageError, add_run, add_settings, escaped,
                        exit_on_stage_error, setting, settings_from, stage_parser, start_stage)
from common.concepts import best_alignment
from common.io import load_npz, safe_name, save_npz, sweep_temporaries, write_csv
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta

log = logging.getLogger("neuron-atlas.13_audit")

LABELS = ("valid", "spurious", "both", "unexpected")


@dataclass(frozen=True)
class RelevanceSettings(ModelAgain):
    """``13_audit.py relevance``'s settings (and the model, named again)."""

    batch_size: int = setting(32, "images per pass", make="BATCH")
    device: str = setting("auto", "auto (cuda if present), cpu, cuda …", make="DEVICE")


MARGIN = 0.2  # with 04's sentence embedder an unrelated concept still gains ~0.1 over the empty
              # text (demo: median 0.1, 90th percentile 0.2), so SemanticLens's 0 labels nearly
              # every neuron "both"; 0.2 keeps the labels for concepts the sentence is about


@dataclass(frozen=True)
class Settings(RelevanceSettings):
    """``13_audit.py audit``'s settings: one flag each, defaults written here only."""

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
# Audit


def confusions(stats: dict, class_names, limit: int = 3) -> str:
    """The most frequent predictions of a class's images, as 'name n, name n'."""
    pairs = sorted(stats["predicted"].items(), key=lambda kv: -kv[1])[:limit]
    return ", ".join(f"{class_names[k] if class_names and k < len(class_names) else k} {n}"
                     for k, n in pairs)


def run_audit(run: Run, concepts_path: Path, settings: Settings = Settings(), text_embedder=None,
              bundle=None, args: dict | None = None) -> dict:
    """Audit the classes of ``concepts_path`` on ``run``; write its 13_audit/ folder.

    ``text_embedder`` and ``bundle`` replace the 04 text embedder and the model — tests pass
    small ones. Returns {"audit": rows, "summary": rows}.
    """
    from common.artefacts import (description_texts, read_descriptions, read_embeddings,
                                  read_mosaics, read_predictions)
    from common.baskets import random_baskets
    from common.embedders import load_text_embedder
    from common.rerun import labelled_images, load_run_model, per_class as class_stats, predict
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
    audit_rows, summary = [], []
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
                sets = random_baskets(n_channels, len(zeroed), controls, seed, exclude=zeroed)
                ctrl = [class_stats(predict(bundle, subset, {layer: s}, batch_size),
                                    subset.labels)[idx] for s in sets]
                row.update(accuracy_zeroed=round(after["accuracy"], 4),
                           confusions_zeroed=confusions(after, bundle.class_names),
                           accuracy_control=round(float(np.mean([c["accuracy"] for c in ctrl])), 4)
                           if ctrl else "",
                           confusions_control=confusions(ctrl[0], bundle.class_names) if ctrl else "",
                           controls=" ".join(",".join(map(str, s)) for s in sets))
        summary.append(row)
        write_reports(out_dir, row, [a for a in audit_rows if a["class_name"] == name],
                      order, mosaics, concepts[name], margin)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(run.audit, audit_rows, columns(AuditRow))
    write_csv(run.audit_summary, summary, columns(AuditSummaryRow))
    write_meta(run.audit_meta, "13_audit", dict(args or {}),
               outputs=[run.audit, run.audit_summary], inputs=metas,
               layer=layer, margin=margin, text_model=getattr(embedder, "name", ""),
               concepts=str(concepts_path))
    for row in summary:
        log.info("%s: spurious share %.3f of the positive relevance; zeroing %d spurious-aligned "
                 "neurons: accuracy %s → %s (random control %s)", row["class_name"],
                 row["spurious_share"], len(row["zeroed"].split()), row.get("accuracy_before"),
                 row.get("accuracy_zeroed", "-"), row.get("accuracy_control", "-"))
    return {"audit": audit_rows, "summary": summary}


def write_reports(out_dir: Path, row: dict, neurons: list[dict], order: list[int],
                  mosaics: dict, concepts: dict, margin: float) -> None:
    """report.md and report.html of one class (common/render.py): figures, then the most relevant
    neurons with label, sentence and mosaic. Sentences and concepts are untrusted text: the
    templates escape them."""
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
        ("accuracy with random sets of the same size zeroed", row.get("accuracy_control", "")),
    ]
    columns = ["rank", "channel", "mosaic", "label", "description", "relevance",
               "valid_alignment", "valid_concept", "spurious_alignment", "spurious_concept"]
    neuron_rows = [dict(n, mosaic=mosaics.get((n["layer"], n["channel"]))) for n in top]
    doc.write_report(folder, f"Audit: {row['class_name']}", [
        doc.heading(f"Audit of class {row['class_name']}", 1),
        doc.paragraph(f"Alignment = cos(neuron, concept) − cos(neuron, empty text); a label needs "
                      f"more than {margin}."),
        doc.table(["fact", "value"], [{"fact": k, "value": v} for k, v in facts]),
        doc.heading("Most relevant neurons"),
        doc.table(columns, neuron_rows, image="mosaic", thumb_px=160,
                  numeric=["rank", "channel", "relevance", "valid_alignment",
                           "spurious_alignment"])])


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
