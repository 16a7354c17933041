"""Stage 08 — semantic debugging: which neurons act differently when class A is mistaken for B,
what they are described as, and whether switching them off undoes the mistake.

Reads (see ARTEFACTS.md): 01_predictions.csv, 01_stats/<layer>.{max,mean}.npy, 01_activations.npz
and 01_extract.meta.json (layers, top images, the model to re-run: a model or weights file only
when --model / --weights name it again, a pickle only with --unsafe-pickle), 02_mosaics.csv and
03_descriptions.csv (shown with each neuron; optional), all in the run folder (--run).
Writes (into the run folder):
  08_confusion.csv                 per true class: accuracy, errors, top confused classes, rank
  08_debug/pairs.csv               every confusion pair with why it was or was not analysed
  08_debug/<true>__<pred>/         per analysed pair: neurons.csv (ranked, with descriptions),
                                   delta_mu.png, z_heatmaps.png, ko_examples.jpg, ok_examples.jpg,
                                   neurons/ (crops from 01 where 02 has no mosaic), ablation.csv
                                   and causal.json (causal check), report.md, report.html
                                   (self-contained: images embedded), report.json (its blocks,
                                   for the atlas's linked copy), why.npz and why/<id>.jpg (per
                                   attributed KO image, its top neurons of all layers ranked
                                   together, with their activation maps over the image)
  08_debug/attributions.npz        relevance (activation × gradient) of every neuron to the wrong
                                   and the right class of the first --attribute-images KO images
                                   of each analysed pair, for the atlas (common/attribution.py)
  08_debug.meta.json               provenance

For a pair (true class T, predicted class P): OK = images of T predicted T, KO = images of T
predicted P. For every neuron and both per-image aggregations (spatial max and mean):
Δμ = μ_KO − μ_OK; the thesis's z = Δμ / σ with σ the pooled standard deviation of the two groups,
flagged by the thesis's rule |z| ≥ 2; t = Δμ over its standard error (Student's two-sample
statistic); the Welch t-test p-value; and its Benjamini–Hochberg q-value over all neurons of all
layers, flagged at q ≤ FDR (the statistics: common/differential.py). The causal check zeroes the
top positive-z neurons of the deepest layer, re-runs the model, and counts KO images that flip to
T, against an equally sized random set of neurons.

Why one image went wrong: for each of the first --attribute-images KO images of a pair, the
--why-neurons neurons of all layers with the largest share of the push from T to P — activation ×
gradient of (logit P − logit T), summed over space, divided by the sum of the absolute values of
its layer on that image, so that layers of any size rank together
(common.attribution.rank_contributions) — each with its activation map over the image. The reports are written as blocks of text,
tables and figures (``report_blocks``) that common/render.py renders through the templates
report.md and report.html.

Example:
  python 08_debug.py --run data/demo                                    # automatic pairs
  python 08_debug.py --run data/r50 --true palace --pred castle --model resnet50 --weights r50.pth
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import difflib
import logging
import math
import shutil
from pathlib import Path

import numpy as np

from common import artefacts
from common import render as doc
from common.classes import name_key
from common.cli import (ModelAgain, StageError, add_run, add_settings, exit_on_stage_error,
                        setting, settings_from, stage_parser, start_stage)
from common.differential import AGGS, STAT_COLS, chance_rate, layer_stats
from common.io import atomic_path, safe_name, sweep_temporaries, write_json, write_text
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta
from common.rerun import load_images, load_run_model

log = logging.getLogger("neuron-atlas.08_debug")

STAGE = "08_debug"
TOP_CONFUSED = 5  # confused classes listed per true class in 08_confusion.csv
EXAMPLES = 8  # KO / OK images shown in each report's contact sheets
TILE_PX = 112  # side of an image in those sheets and in crop strips
WHY_TILE = 128  # side of the image and of each neuron's map in why/<image id>.jpg
WHY_IN_REPORT = 3  # misclassified images whose "why" the report shows (all: why/ and the atlas)
FIGURE_PX = 2400  # longest side of a plot embedded in the report: its own size, never shrunk


@dataclasses.dataclass(frozen=True)
class Settings(ModelAgain):
    """What to analyse and how: one flag per field (``--min-errors`` …), defaults written here
    only; ``make`` names the Makefile variable that sets a field. The model to re-run (causal
    check and relevance) is named again by ``ModelAgain``'s fields."""

    true: str | None = setting(None, "true class to debug (name, label or index)", make="TRUE")
    pred: str | None = setting(
        None, "confusing class (default with --true: its most frequent wrong prediction)",
        make="PRED")
    min_errors: int = setting(5, "auto: least KO images of a pair", make="MIN_ERRORS")
    min_share: float = setting(
        0.25, "auto: least share of the true class's errors that go to the pair's class",
        make="MIN_SHARE")
    min_images: int = setting(3, "least OK and KO images needed to compare them")
    max_pairs: int = setting(2, "auto: most pairs analysed", make="MAX_PAIRS")
    fdr: float = setting(0.05, "Benjamini–Hochberg level of the flag_fdr", make="FDR")
    z_threshold: float = setting(2.0, "the thesis's rule: flag_z when |z| = |Δμ| / σ ≥ this")
    rank_by: str = setting("mean", "aggregation used to rank neurons and pick the ones to ablate",
                           choices=AGGS)
    show_top: int = setting(8, "neurons shown with images in reports")
    ablate_top: int = setting(
        10, "positive-z neurons of the deepest layer zeroed in the causal check (0: no check)",
        make="ABLATE_TOP")
    attribute_images: int = setting(
        30, "misclassified images per analysed pair whose neurons' relevance to the wrong and "
        "the right class is computed for the atlas (activation × gradient; 0: none; with "
        "--ablate-top 0 too, no model is loaded)")
    why_neurons: int = setting(
        8, "neurons of all layers, ranked together, shown with their activation maps for each "
        "attributed misclassified image (why.npz; 0: none)")
    ablation_sample: int = setting(
        200, "labelled images (random, seeded) on which overall accuracy is measured; 0: all")
    batch_size: int = setting(32, "images per forward pass", make="BATCH")
    seed: int = setting(0, "seed of the sample and random control")
    device: str = setting("auto", "auto (cuda if present), cpu, cuda …", make="DEVICE")


# ----------------------------------------------------------------------------------------------
# Predictions, confusion table and pair selection


def read_predictions(path: Path) -> tuple[list[dict], dict[int, str]]:
    """Labelled rows of 01_predictions.csv with integer ids, and the paths of all usable images.

    Unlabelled images take no part in the confusion analysis, but they can be among a neuron's
    top images, so their paths are kept.
    """
    predictions = artefacts.read_predictions(path)
    paths = {p.image_id: p.path for p in predictions}
    rows = [dataclasses.asdict(p) for p in predictions if p.label_idx >= 0]
    return rows, paths


def class_names(rows: list[dict], model_classes: list[str] | None = None) -> dict[int, str]:
    """Class index → name: the model's class names as 01 recorded them; else the name where a row
    predicts it, and for a class never predicted the ImageNet name when the model's names are
    ImageNet's, else the dataset label."""
    from common import imagenet
    if model_classes:
        return dict(enumerate(model_classes))
    names: dict[int, str] = {}
    for row in rows:
        names.setdefault(row["pred_idx"], row["pred_name"])
    reference = imagenet.class_names()
    if all(0 <= i < len(reference) and reference[i] == name for i, name in names.items()):
        for row in rows:
            names.setdefault(row["label_idx"], reference[row["label_idx"]])
    for row in rows:
        names.setdefault(row["label_idx"], row["label"] or str(row["label_idx"]))
    return names


def confusion_table(rows: list[dict], names: dict[int, str]) -> list[dict]:
    """Per true class: n, correct, errors, accuracy, top confused classes; ranked by errors.

    Rank 1 is the class with the most errors (ties: lower accuracy first), the thesis's
    "problem classes" list.
    """
    per_class: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        per_class[row["label_idx"]][row["pred_idx"]] += 1
    out = []
    for idx, counts in per_class.items():
        n = sum(counts.values())
        correct = counts.get(idx, 0)
        wrong = sorted(((c, p) for p, c in counts.items() if p != idx), key=lambda t: (-t[0], t[1]))
        errors = n - correct
        top_count, top_pred = wrong[0] if wrong else (0, "")
        out.append({"class_idx": idx, "class": names[idx], "n": n, "correct": correct,
                    "errors": errors, "accuracy": round(correct / n, 4),
                    "top1_pred_idx": top_pred,
                    "top1_pred": names[top_pred] if wrong else "",
                    "top1_count": top_count,
                    "top1_share": round(top_count / errors, 4) if errors else "",
                    "top_confused": "; ".join(f"{names[p]}:{c}" for c, p in wrong[:TOP_CONFUSED])})
    out.sort(key=lambda r: (-r["errors"], r["accuracy"], r["class_idx"]))
    for rank, row in enumerate(out, 1):
        row["rank"] = rank
    return out


def resolve_class(text: str, rows: list[dict], names: dict[int, str], flag: str) -> int:
    """The class index meant by ``text``: an index, a model class name, or a dataset label."""
    if text.strip().lstrip("-").isdigit():
        idx = int(text)
        if idx not in names:
            raise StageError(f"{flag} {idx}: no labelled image has or is predicted as class {idx}")
        return idx
    key = name_key(text)
    matches = {i for i, name in names.items() if name_key(name) == key}
    matches |= {r["label_idx"] for r in rows if name_key(r["label"]) == key}
    if len(matches) == 1:
        return matches.pop()
    if matches:  # several
        listed = ", ".join(f"{i} ({names[i]})" for i in sorted(matches))
        raise StageError(f"{flag} {text!r} names several classes: {listed}; give the index instead")
    valid = sorted(set(names.values()))
    close = difflib.get_close_matches(text, valid, n=5)
    hint = f" Close names: {', '.join(close)}." if close else ""
    shown = ", ".join(valid[:40]) + (f" … ({len(valid)} in all)" if len(valid) > 40 else "")
    raise StageError(f"{flag} {text!r} matches no class of the model.{hint} Valid names: "
                     f"{shown} (or a class index)")


def folder_name(true_name: str, pred_name: str) -> str:
    """``<true>__<pred>`` with anything but letters, digits, dot and dash replaced by ``_``."""
    return f"{safe_name(true_name, 'class')}__{safe_name(pred_name, 'class')}"


def pair_counts(rows: list[dict]) -> tuple[collections.Counter, collections.Counter,
                                          collections.Counter]:
    """Counts per (true, pred) pair, labelled images per class, correct images per class."""
    pairs, n_true, correct = collections.Counter(), collections.Counter(), collections.Counter()
    for row in rows:
        n_true[row["label_idx"]] += 1
        if row["pred_idx"] == row["label_idx"]:
            correct[row["label_idx"]] += 1
        else:
            pairs[(row["label_idx"], row["pred_idx"])] += 1
    return pairs, n_true, correct


def select_pairs(rows: list[dict], names: dict[int, str], min_errors: int, min_share: float,
                 min_images: int, max_pairs: int) -> list[dict]:
    """Every confusion pair with a status: ``selected`` / ``fallback`` pairs are analysed.

    The thesis's criteria: enough errors (KO ≥ ``min_errors``), errors concentrated on the
    confusing class (KO / errors of the true class ≥ ``min_share``), and enough images on both
    sides for statistics (OK and KO ≥ ``min_images``). The best ``max_pairs`` by KO count are
    selected. When none passes, the most frequent confusion that still has ``min_images`` on both
    sides is analysed as a ``fallback`` (its report says so).
    """
    pairs, n_true, correct = pair_counts(rows)
    out = []
    for (t, p), ko in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])):
        errors = n_true[t] - correct[t]
        share = ko / errors
        ok = correct[t]
        if ko < min_errors:
            reason = f"{ko} errors < --min-errors {min_errors}"
        elif share < min_share:
            reason = f"share of the class's errors {share:.2f} < --min-share {min_share}"
        elif min(ok, ko) < min_images:
            reason = f"OK {ok} / KO {ko}: fewer than --min-images {min_images}"
        else:
            reason = ""
        out.append({"true_idx": t, "true": names[t], "pred_idx": p, "pred": names[p],
                    "n_true": n_true[t], "ok": ok, "ko": ko, "share": round(share, 4),
                    "status": "candidate" if not reason else "skipped", "reason": reason,
                    "folder": ""})
    passing = [r for r in out if r["status"] == "candidate"]
    for i, row in enumerate(passing):
        row["status"] = "selected" if i < max_pairs else "skipped"
        row["reason"] = "passes the thresholds" if i < max_pairs else \
            f"passes, but only the best --max-pairs {max_pairs} are analysed"
    if not passing:
        feasible = [r for r in out if min(r["ok"], r["ko"]) >= min_images]
        if feasible:
            fb = feasible[0]
            fb["status"] = "fallback"
            fb["reason"] = (f"no pair passed the thresholds (--min-errors {min_errors}, "
                            f"--min-share {min_share}); this is the most frequent confusion with "
                            f"at least {min_images} OK and KO images ({fb['reason']})")
    return out


def explicit_pair(rows: list[dict], names: dict[int, str], true_text: str,
                  pred_text: str | None) -> dict:
    """The pair asked for with ``--true`` (and ``--pred``; default: the most frequent confusion)."""
    t = resolve_class(true_text, rows, names, "--true")
    pairs, n_true, correct = pair_counts(rows)
    if n_true[t] == 0:
        raise StageError(f"--true {true_text!r}: no labelled image of class {t} ({names[t]})")
    if pred_text is None:
        confused = sorted(((c, p) for (tt, p), c in pairs.items() if tt == t),
                          key=lambda cp: (-cp[0], cp[1]))
        if not confused:
            raise StageError(f"class {names[t]} has no error to debug ({n_true[t]} images, all "
                             f"correct)")
        p = confused[0][1]
    else:
        p = resolve_class(pred_text, rows, names, "--pred")
    if p == t:
        raise StageError(f"--true and --pred are the same class ({names[t]})")
    errors = n_true[t] - correct[t]
    ko = pairs.get((t, p), 0)
    return {"true_idx": t, "true": names[t], "pred_idx": p, "pred": names[p], "n_true": n_true[t],
            "ok": correct[t], "ko": ko, "share": round(ko / errors, 4) if errors else 0.0,
            "status": "requested", "reason": "asked for with --true/--pred", "folder": ""}


def split_ok_ko(rows: list[dict], pair: dict) -> tuple[np.ndarray, np.ndarray]:
    """Image ids of OK (true class, correct) and KO (true class, predicted as the pair's class)."""
    t, p = pair["true_idx"], pair["pred_idx"]
    ok = sorted(r["image_id"] for r in rows if r["label_idx"] == t and r["pred_idx"] == t)
    ko = sorted(r["image_id"] for r in rows if r["label_idx"] == t and r["pred_idx"] == p)
    return np.asarray(ok, dtype=np.int64), np.asarray(ko, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# The neuron table (statistics: common/differential.py)


def neuron_rows(stats: dict, layers: list[str], rank_by: str, descriptions: dict,
                mosaics: dict) -> list[dict]:
    """One row per neuron with both aggregations' statistics, ranked by |z| of ``rank_by``."""
    rows = []
    for layer in layers:
        c = len(stats[layer][rank_by]["z"])
        for ch in range(c):
            row = {"layer": layer, "channel": ch}
            for agg in AGGS:
                res = stats[layer][agg]
                for col in STAT_COLS:
                    value = res[col][ch]
                    row[f"{agg}_{col}"] = (int(value) if col.startswith("flag")
                                           else float(f"{value:.6g}"))
            row["description"] = descriptions.get((layer, ch), "")
            mosaic = mosaics.get((layer, ch))
            row["mosaic"] = "" if mosaic is None else str(mosaic)
            rows.append(row)
    rows.sort(key=lambda r: (-abs(r[f"{rank_by}_z"]), layers.index(r["layer"]), r["channel"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


# ----------------------------------------------------------------------------------------------
# Figures and images


def plot_delta_hist(stats: dict, layers: list[str], path: Path, z_threshold: float) -> None:
    """Histograms of Δμ per layer (rows) and aggregation (columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(layers), len(AGGS), figsize=(10, 2.6 * len(layers)),
                             squeeze=False)
    for i, layer in enumerate(layers):
        for j, agg in enumerate(AGGS):
            res = stats[layer][agg]
            ax = axes[i][j]
            ax.hist(res["delta_mu"], bins=40, color="#4a7ab5")
            ax.axvline(0, color="k", lw=0.8)
            ax.set_title(f"{layer} · {agg}: |z|≥{z_threshold:g} {int(res['flag_z'].sum())}, "
                         f"FDR {int(res['flag_fdr'].sum())} of {len(res['z'])}", fontsize=12)
            ax.tick_params(labelsize=11)
    for ax in axes[-1]:
        ax.set_xlabel("Δμ = μ_KO − μ_OK", fontsize=12)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def plot_z_heatmaps(stats: dict, layers: list[str], path: Path, z_threshold: float) -> None:
    """z of every channel laid out on a near-square grid, per layer (rows) and aggregation.

    Colours are symmetric around 0 (red: more active on KO, blue: less); dots mark
    |z| ≥ threshold.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(layers), len(AGGS), figsize=(10, 3.4 * len(layers)),
                             squeeze=False)
    for i, layer in enumerate(layers):
        for j, agg in enumerate(AGGS):
            z = np.clip(stats[layer][agg]["z"], -1e3, 1e3)
            width = int(math.ceil(math.sqrt(len(z))))
            height = int(math.ceil(len(z) / width))
            grid = np.full(width * height, np.nan)
            grid[:len(z)] = z
            grid = grid.reshape(height, width)
            lim = max(z_threshold + 1, float(np.nanmax(np.abs(z))) if len(z) else 1.0)
            ax = axes[i][j]
            im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ys, xs = np.nonzero(np.abs(grid) >= z_threshold)
            ax.scatter(xs, ys, s=4, c="k", marker=".")
            ax.set_title(f"{layer} · {agg} (channel = row·{width} + column)", fontsize=12)
            ax.set_xticks([])
            ax.set_yticks([])
            bar = fig.colorbar(im, ax=ax, shrink=0.8)
            bar.set_label("z = Δμ / σ", fontsize=11)
            bar.ax.tick_params(labelsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def open_network_input(path: str, size: int, channels: int = 3):
    """An image as the network saw it (shorter side resized, centre crop, grey for a grey model),
    or None if unreadable."""
    from common.images import BadImage, load_rgb, network_view
    try:
        img, _ = load_rgb(path)
    except BadImage as err:
        log.warning("cannot show %s: %s", path, err.reason)
        return None
    return network_view(img, size, channels)


def contact_sheet(tiles: list, path: Path, columns: int = 4) -> bool:
    """Save PIL ``tiles`` (already ``TILE_PX`` square) as one JPEG grid; False if there are none."""
    from PIL import Image
    tiles = [t for t in tiles if t is not None]
    if not tiles:
        return False
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * TILE_PX, rows * TILE_PX), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile.resize((TILE_PX, TILE_PX)), ((i % cols) * TILE_PX, (i // cols) * TILE_PX))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="JPEG", quality=88)
    return True


def example_sheet(ids: np.ndarray, paths: dict[int, str], size: int, path: Path,
                  channels: int = 3) -> bool:
    """Contact sheet of the first ``EXAMPLES`` images of ``ids``, as fed to the network."""
    return contact_sheet([open_network_input(paths[i], size, channels) for i in ids[:EXAMPLES]],
                         path)


def crop_strip(activations: Path, layer: str, channel: int, paths: dict[int, str], size: int,
               path: Path, channels: int = 3) -> bool:
    """The neuron's top receptive-field crops from 01 as a strip (used when 02 has no mosaic)."""
    from common.fields import RF, crop_box
    top = artefacts.read_activations(activations, layers=[layer])[2][layer]
    ids, ys, xs = top.image_ids[channel], top.y[channel], top.x[channel]
    rf = RF.from_array(top.rf)
    tiles = []
    for image_id, y, x in zip(ids[:EXAMPLES], ys[:EXAMPLES], xs[:EXAMPLES]):
        if image_id < 0 or int(image_id) not in paths:
            continue
        img = open_network_input(paths[int(image_id)], size, channels)
        if img is None:
            continue
        top, left, bottom, right = crop_box(rf, int(y), int(x), img.height, img.width)
        if bottom > top and right > left:
            tiles.append(img.crop((left, top, right, bottom)))
    return contact_sheet(tiles, path, columns=EXAMPLES)


def why_strip(picture, ranked: list[dict], path: Path) -> None:
    """why/<image id>.jpg: the image as the network saw it, then each of its ``ranked`` neurons'
    activation map over it (common.images.overlay), ``WHY_TILE`` px each, captioned with the
    neuron and its share in a 13 px font."""
    from PIL import Image, ImageDraw, ImageFont
    from common.images import overlay
    font = ImageFont.load_default(size=13)
    band = 36  # caption height: two lines
    tiles = [(picture, "the image", "as seen")] + [
        (overlay(picture, r["map"]), f"{r['layer']} #{r['channel']}",
         f"share {100 * r['share']:.0f}%") for r in ranked]
    sheet = Image.new("RGB", (len(tiles) * WHY_TILE, WHY_TILE + band), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (tile, line1, line2) in enumerate(tiles):
        x = k * WHY_TILE
        sheet.paste(tile.convert("RGB").resize((WHY_TILE, WHY_TILE)), (x, 0))
        draw.text((x + 3, WHY_TILE + 2), line1[:19], fill="black", font=font)
        draw.text((x + 3, WHY_TILE + 18), line2, fill="#444", font=font)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="JPEG", quality=85)


def write_why(analysis: dict, records: dict[int, dict], ctx: dict) -> list[int]:
    """why.npz and why/<image id>.jpg of one pair from ``attribute_images``' records of its KO
    images; returns the ids written (those the model ran on and that could be read)."""
    files = analysis["files"]
    ids = [int(i) for i in analysis["ko_ids"] if int(i) in records and "top" in records[int(i)]]
    if files.why_strips.is_dir():
        shutil.rmtree(files.why_strips)  # strips of images an earlier run chose
    if not ids:
        files.why.unlink(missing_ok=True)
        return []
    artefacts.write_why(files.why, ctx["layers"], {i: records[i] for i in ids})
    why = artefacts.read_why(files.why)
    files.why_strips.mkdir(parents=True, exist_ok=True)
    for i in ids:
        picture = open_network_input(ctx["paths"][i], ctx["input_size"], ctx["channels"])
        if picture is not None:
            why_strip(picture, why.of(i), files.why_strips / f"{i}.jpg")
    return ids


# ----------------------------------------------------------------------------------------------
# Causal check: ablation of suspect neurons


def predict_probs(bundle, images, ids: list[int], ablation: dict | None, batch_size: int,
                  desc: str) -> dict[int, np.ndarray]:
    """Softmax outputs for those of ``ids`` among ``images`` (common.rerun.Images), by id,
    optionally ablated."""
    from common.rerun import predict
    chosen = images.select(ids)
    return dict(zip(chosen.ids, predict(bundle, chosen, ablation, batch_size, desc)))


def causal_check(bundle, images, base: dict[int, np.ndarray], layer: str,
                 suspects: list[int], control: list[int], pair: dict, ok_ids, ko_ids,
                 sample_ids, rows_by_id: dict[int, dict], batch_size: int) -> tuple[dict, list]:
    """Zero ``suspects`` (then, as a control, ``control``) in ``layer`` and compare predictions.

    Returns a summary (flips of KO to the true class, accuracy on OK and on the sample, before and
    after) and one row per evaluated image for ablation.csv. "Before" is the model re-run here
    without ablation, so both sides come from the same code path. The control is run on KO and OK
    only (the comparison that matters), which keeps the check affordable on a CPU.
    """
    t, p = pair["true_idx"], pair["pred_idx"]
    pair_ids = sorted(set(ok_ids.tolist()) | set(ko_ids.tolist()))
    ids = sorted(set(pair_ids) | set(sample_ids))
    ablated = predict_probs(bundle, images, ids, {layer: suspects}, batch_size, "08 ablated")
    ctrl = predict_probs(bundle, images, pair_ids, {layer: control}, batch_size, "08 control")
    ids = [i for i in ids if i in ablated]

    def acc(group, probs) -> float | None:
        """Accuracy of ``probs`` on the images of ``group`` (None if empty)."""
        g = [i for i in group if i in probs]
        if not g:
            return None
        return float(np.mean([int(np.argmax(probs[i])) == rows_by_id[i]["label_idx"] for i in g]))

    ko = [i for i in ko_ids.tolist() if i in ablated]
    ok = [i for i in ok_ids.tolist() if i in ablated]
    sample = [i for i in sample_ids if i in ablated]

    def summary(probs, on_sample: bool = True) -> dict:
        """KO flips and accuracies under one ablation."""
        return {"ko_to_true": sum(int(np.argmax(probs[i])) == t for i in ko),
                "ko_left_pred": sum(int(np.argmax(probs[i])) != p for i in ko),
                "ko_p_true": float(np.mean([probs[i][t] for i in ko])) if ko else None,
                "ok_accuracy": acc(ok, probs),
                "all_accuracy": acc(sample, probs) if on_sample else None}

    base_agree = float(np.mean([int(np.argmax(base[i])) == rows_by_id[i]["pred_idx"]
                                for i in ids])) if ids else None
    result = {"layer": layer, "suspects": suspects, "control": control, "n_ko": len(ko),
              "n_ok": len(ok), "n_all": len(sample),
              "ko_base_pred": sum(int(np.argmax(base[i])) == p for i in ko),
              "before": summary(base), "ablated": summary(ablated),
              "control_ablated": summary(ctrl, on_sample=False), "rerun_agreement": base_agree}
    group = {i: "KO" for i in ko} | {i: "OK" for i in ok}
    rows = [{"image_id": i, "group": group.get(i, "sample"),
             "label_idx": rows_by_id[i]["label_idx"], "pred_01": rows_by_id[i]["pred_idx"],
             "pred_base": int(np.argmax(base[i])), "pred_ablated": int(np.argmax(ablated[i])),
             "pred_control": int(np.argmax(ctrl[i])) if i in ctrl else "",
             "p_true_base": round(float(base[i][t]), 5),
             "p_true_ablated": round(float(ablated[i][t]), 5)} for i in ids]
    return result, rows


def suspects_of(stats: dict, layer: str, rank_by: str, n: int) -> list[int]:
    """The ``n`` channels of ``layer`` with the largest positive z (fewer if fewer are positive)."""
    z = stats[layer][rank_by]["z"]
    order = [int(c) for c in np.argsort(-z, kind="stable") if z[c] > 0]
    return order[:n]


def control_of(n_channels: int, suspects: list[int], seed: int) -> list[int]:
    """As many random channels as ``suspects``, none of them a suspect (a size-matched control)."""
    rng = np.random.default_rng(seed)
    pool = np.setdiff1d(np.arange(n_channels), suspects)
    return sorted(int(c) for c in rng.choice(pool, size=min(len(suspects), len(pool)),
                                             replace=False))


# ----------------------------------------------------------------------------------------------
# Reports: what they say, as blocks (common/render.py writes them as Markdown and HTML)


def report_blocks(pair: dict, ctx: dict) -> list[dict]:
    """The report of one analysed pair, as common/render.py blocks (plain text: the templates
    escape it)."""
    num, pct = doc.fmt_number, doc.fmt_percent
    settings: Settings = ctx["settings"]
    t, p = pair["true"], pair["pred"]
    n_ok, n_ko = len(ctx["ok_ids"]), len(ctx["ko_ids"])
    blocks = [doc.heading(f"Why is “{t}” predicted as “{p}”?", 1),
              doc.paragraph(f"Model: {ctx['model_name']}. Images labelled {t}: {pair['n_true']}, "
                            f"of which {n_ok} are predicted correctly (OK) and {n_ko} are "
                            f"predicted as {p} (KO); {pair['share']:.0%} of the class's errors go "
                            f"to {p}.")]
    if pair["status"] == "fallback":
        blocks.append(doc.note(f"Fallback: {pair['reason']}. Treat the results with extra care."))
    elif pair["status"] == "requested":
        blocks.append(doc.paragraph("Pair chosen by the user (--true/--pred)."))
    else:
        blocks.append(doc.paragraph(f"Chosen automatically: {pair['reason']}."))
    crow = ctx["confusion_row"]
    blocks.append(doc.paragraph(
        f"Class {t}: accuracy {pct(crow['accuracy'])}, {crow['errors']} errors (problem-class "
        f"rank {crow['rank']}); most confused with: {crow['top_confused'] or 'none'}."))
    if ctx.get("ko_sheet"):
        blocks.append(doc.figure(ctx["ko_sheet"], f"KO: {t} images predicted as {p}"))
    if ctx.get("ok_sheet"):
        blocks.append(doc.figure(ctx["ok_sheet"], f"OK: {t} images predicted correctly"))

    rule = f"|z|≥{settings.z_threshold:g}"
    blocks += [doc.heading("Differential neurons per layer"), doc.paragraph(
        f"For each neuron, Δμ = μ_KO − μ_OK of its per-image activation; the thesis's z = Δμ / σ "
        f"with σ the pooled standard deviation of OK and KO; t = Δμ over its standard error "
        f"(Student's two-sample statistic), a Welch t-test p-value and its Benjamini–Hochberg "
        f"q-value over all neurons of all layers. '{rule}' counts the thesis's rule; 'expected' "
        f"is how many neurons it would flag by chance alone. 'FDR' counts neurons with "
        f"q ≤ {settings.fdr:g}, the flag that accounts for testing many neurons.")]
    stats, layers = ctx["stats"], ctx["layers"]
    layer_rows = []
    for layer in layers:
        lo, lk = stats["_n"][layer]
        c = len(stats[layer]["max"]["z"])
        row = {"layer": layer, "channels": c, "OK": lo, "KO": lk,
               "expected": f"{c * chance_rate(lo, lk, settings.z_threshold):.1f}"}
        for agg in AGGS:
            row[f"{rule} ({agg})"] = int(stats[layer][agg]["flag_z"].sum())
            row[f"FDR ({agg})"] = int(stats[layer][agg]["flag_fdr"].sum())
        layer_rows.append(row)
    blocks += [doc.table(layer_rows[0].keys(), layer_rows,
                         numeric=[k for k in layer_rows[0] if k != "layer"]),
               # At their own size (about 900 px wide): shrunk to fit 900 px of height, their
               # labels were ~7 px high.
               doc.figure(ctx["hist_png"], "Distribution of Δμ per layer", photo=False,
                          max_px=FIGURE_PX),
               doc.figure(ctx["heat_png"], "z per channel and layer (dots: |z| above the rule; "
                          "the atlas's page of this pair names each cell on hover)",
                          photo=False, max_px=FIGURE_PX)]

    rb = settings.rank_by
    blocks += [doc.heading("Most anomalous neurons"), doc.paragraph(
        f"Ranked by |z| of the per-image {rb}. Positive z: the neuron is more active on the "
        f"misclassified images (a candidate cause); negative: it is less active (evidence for {t} "
        f"that is missing).")]
    top_rows = []
    for r in ctx["top_neurons"]:
        top_rows.append({"rank": r["rank"], "layer": r["layer"], "channel": r["channel"],
                         "z": num(r[f"{rb}_z"]), "Δμ": num(r[f"{rb}_delta_mu"]),
                         "t": num(r[f"{rb}_t"]), "q": num(r[f"{rb}_q"]),
                         "FDR": "yes" if r[f"{rb}_flag_fdr"] else "no",
                         "description": r["description"] or "(no description)",
                         "images": r.get("_image"),
                         "_href": artefacts.neuron_page(r["layer"], r["channel"])})
    blocks += [doc.table(["rank", "layer", "channel", "z", "Δμ", "t", "q", "FDR",
                          "description", "images"], top_rows,
                         numeric=["rank", "channel", "z", "Δμ", "t", "q"], image="images",
                         link="channel"),
               doc.paragraph("How far to trust each description (09's verification against a "
                             "control, and the clarity of the neuron's crops) is shown beside "
                             "these neurons on this pair's page of the atlas (make atlas).")]

    blocks += why_blocks(pair, ctx)
    blocks.append(doc.heading("Causal check"))
    cc = ctx.get("causal")
    if cc is None:
        blocks.append(doc.paragraph(ctx.get("causal_note") or "Not run (--ablate-top 0)."))
    else:
        b, a, c = cc["before"], cc["ablated"], cc["control_ablated"]
        suspects = ", ".join(map(str, cc["suspects"]))
        blocks.append(doc.paragraph(
            f"The {len(cc['suspects'])} channels of the deepest layer {cc['layer']} with the "
            f"largest positive z ({suspects}) were set to zero and the model re-run; as a control, "
            f"{len(cc['control'])} random other channels of that layer were zeroed instead. The "
            f"re-run without ablation agrees with 01's predictions on "
            f"{pct(cc['rerun_agreement'])} of these images."))
        measures = ["before", "suspects zeroed", "random zeroed"]
        rows = [
            [f"KO images predicted {t} (of {cc['n_ko']})",
             b["ko_to_true"], a["ko_to_true"], c["ko_to_true"]],
            [f"KO images no longer predicted {p}",
             cc["n_ko"] - cc["ko_base_pred"], a["ko_left_pred"], c["ko_left_pred"]],
            [f"mean probability of {t} on KO",
             num(b["ko_p_true"]), num(a["ko_p_true"]), num(c["ko_p_true"])],
            [f"accuracy on OK ({cc['n_ok']})",
             pct(b["ok_accuracy"]), pct(a["ok_accuracy"]), pct(c["ok_accuracy"])],
            [f"accuracy on {cc['n_all']} labelled images (random sample)",
             pct(b["all_accuracy"]), pct(a["all_accuracy"]), "not run"]]
        verdict = "more than" if a["ko_to_true"] > c["ko_to_true"] else "no more than"
        blocks += [doc.table(["measure"] + measures,
                             [dict(zip(["measure"] + measures, row)) for row in rows],
                             numeric=measures),
                   doc.paragraph(f"Zeroing the suspects turned {a['ko_to_true']} of {cc['n_ko']} "
                                 f"KO images into {t}, {verdict} zeroing random channels "
                                 f"({c['ko_to_true']}). Per-image predictions before and after: "
                                 f"ablation.csv.")]

    blocks += [doc.heading("How to read this"), doc.paragraph(
        "Differences in activation show correlation with the error, not its cause; the causal "
        "check is the stronger evidence, and only when the suspects change predictions clearly "
        "more than the random control. With few OK or KO images the statistics are weak, and "
        "near-duplicate images (views of one photo) make them look stronger than they are. "
        "Descriptions are written by a model and can be wrong. All neurons: neurons.csv.")]
    return blocks


def why_blocks(pair: dict, ctx: dict) -> list[dict]:
    """The report's "why" section: for the first ``WHY_IN_REPORT`` attributed KO images, the
    neurons of all layers that pushed it most from the true to the predicted class, with their
    maps (why/<id>.jpg) and a table whose channels link to the atlas's neuron pages."""
    from common.attribution import WHY_NOTE
    t, p = pair["true"], pair["pred"]
    blocks = [doc.heading(f"Why these images were called {p}")]
    why, ids = ctx.get("why"), ctx.get("why_ids") or []
    if why is None or not ids:
        return blocks + [doc.paragraph(ctx.get("attribution_error") or
                                       "Not computed (--attribute-images 0 or --why-neurons 0).")]
    blocks.append(doc.paragraph(
        f"For each of {len(ids)} misclassified images (the first by image id, at most "
        f"--attribute-images), the neurons of all layers ranked together by how much of the push "
        f"from {t} to {p} passes through them. {WHY_NOTE} The first {min(WHY_IN_REPORT, len(ids))} "
        f"images are shown here; why/ has one picture per image, and the atlas a page per image."))
    descriptions = ctx["descriptions"]
    for i in ids[:WHY_IN_REPORT]:
        strip = ctx["files"].why_strips / f"{i}.jpg"
        if strip.exists():
            blocks.append(doc.figure(strip, f"Image {i} ({t} predicted as {p}) and the "
                                            f"activation maps of its top neurons",
                                     max_px=WHY_TILE * (1 + len(why.of(i)))))
        rows = [{"rank": k, "layer": r["layer"], "channel": r["channel"],
                 "share": doc.fmt_percent(r["share"]), "relevance": doc.fmt_number(r["relevance"]),
                 "description": descriptions.get((r["layer"], r["channel"]), "")
                 or "(no description)", "_href": artefacts.neuron_page(r["layer"], r["channel"])}
                for k, r in enumerate(why.of(i), 1)]
        blocks.append(doc.table(["rank", "layer", "channel", "share", "relevance",
                                 "description"], rows,
                                numeric=["rank", "channel", "share", "relevance"],
                                link="channel"))
    return blocks


# ----------------------------------------------------------------------------------------------
# The stage


def analyse_pair(pair: dict, rows: list[dict], ctx: dict, run: artefacts.Run) -> dict | None:
    """Statistics, figures and neuron table of one pair; None (logged) when it cannot be analysed.

    Too few images is a StageError for a pair the user asked for, and a logged skip otherwise.
    """
    settings: Settings = ctx["settings"]
    label = f"{pair['true']} → {pair['pred']}"
    ok_ids, ko_ids = split_ok_ko(rows, pair)
    # ImageNet has two classes called "crane" (and two "maillot"): add the index to such names.
    unique = [name if name not in ctx["shared_names"] else f"{name}-{idx}"
              for name, idx in ((pair["true"], pair["true_idx"]), (pair["pred"], pair["pred_idx"]))]
    files = run.pair(folder_name(*unique))
    folder = files.folder
    try:
        if min(len(ok_ids), len(ko_ids)) < settings.min_images:
            raise StageError(f"pair {label}: OK has {len(ok_ids)} images and KO {len(ko_ids)}; the "
                             f"comparison needs at least {settings.min_images} in each "
                             f"(--min-images). Pick a pair with more errors, or add images")
        stats = layer_stats(ctx["stats_dir"], ctx["layers"], ok_ids, ko_ids, settings.min_images,
                            label, settings.fdr, settings.z_threshold)
    except StageError as err:
        if pair["status"] == "requested":
            raise
        log.warning("skipping %s: %s", label, err)
        pair["status"], pair["reason"] = "skipped", str(err)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    pair["folder"] = folder.name
    table = neuron_rows(stats, ctx["layers"], settings.rank_by, ctx["descriptions"],
                       ctx["mosaics"])
    artefacts.write_debug_neurons(files.neurons, table)
    plot_delta_hist(stats, ctx["layers"], files.delta_png, settings.z_threshold)
    plot_z_heatmaps(stats, ctx["layers"], files.heat_png, settings.z_threshold)
    top = [dict(r) for r in table[:settings.show_top]]
    for r in top:
        if r["mosaic"] and Path(r["mosaic"]).exists():
            r["_image"] = Path(r["mosaic"])
        else:
            strip = files.strips / f"{folder_name(r['layer'], str(r['channel']))}.jpg"
            strip.parent.mkdir(exist_ok=True)
            r["_image"] = strip if crop_strip(ctx["activations"], r["layer"], r["channel"],
                                              ctx["paths"], ctx["input_size"], strip,
                                              ctx["channels"]) else None
    size, channels = ctx["input_size"], ctx["channels"]
    info = {"pair": pair, "folder": folder, "files": files, "ok_ids": ok_ids, "ko_ids": ko_ids,
            "stats": stats, "top_neurons": top, "hist_png": files.delta_png,
            "heat_png": files.heat_png,
            "ko_sheet": files.ko_examples if example_sheet(
                ko_ids, ctx["paths"], size, files.ko_examples, channels) else None,
            "ok_sheet": files.ok_examples if example_sheet(
                ok_ids, ctx["paths"], size, files.ok_examples, channels) else None}
    flagged = {agg: sum(int(stats[layer][agg]["flag_fdr"].sum()) for layer in ctx["layers"])
               for agg in AGGS}
    log.info("%s: OK %d, KO %d; FDR-flagged neurons: max %d, mean %d → %s", label, len(ok_ids),
             len(ko_ids), flagged["max"], flagged["mean"], folder)
    return info


def run_causal(analyses: list[dict], rows: list[dict], ctx: dict, bundle, image_tensor) -> None:
    """Ablation re-runs for every analysed pair; results go into each analysis dict."""
    settings: Settings = ctx["settings"]
    rows_by_id = {r["image_id"]: r for r in rows}
    rng = np.random.default_rng(settings.seed)
    all_ids = sorted(rows_by_id)
    size = settings.ablation_sample
    sample = sorted(int(i) for i in (rng.choice(all_ids, size=size, replace=False)
                                     if 0 < size < len(all_ids) else all_ids))
    needed = set(sample)
    for a in analyses:
        needed |= set(a["ok_ids"].tolist()) | set(a["ko_ids"].tolist())
    images = load_images(bundle, [(i, ctx["paths"][i], rows_by_id[i]["label_idx"])
                                  for i in sorted(needed)], {}, image_tensor, "08 load images")
    base = predict_probs(bundle, images, images.ids, None, settings.batch_size, "08 baseline")
    layer = ctx["layers"][-1]
    for a in analyses:
        suspects = suspects_of(a["stats"], layer, settings.rank_by, settings.ablate_top)
        if not suspects:
            a["causal_note"] = (f"No channel of {layer} is more active on KO than on OK: "
                                "nothing to ablate.")
            continue
        n_channels = len(a["stats"][layer][settings.rank_by]["z"])
        control = control_of(n_channels, suspects, settings.seed)
        result, per_image = causal_check(bundle, images, base, layer, suspects, control,
                                         a["pair"], a["ok_ids"], a["ko_ids"], sample, rows_by_id,
                                         settings.batch_size)
        a["causal"] = result
        artefacts.write_ablation(a["files"].ablation, per_image)
        write_json(a["files"].causal, result)
        log.info("%s → %s: zeroing %d channels of %s flips %d of %d KO images to %s "
                 "(random control: %d)", a["pair"]["true"], a["pair"]["pred"], len(suspects), layer,
                 result["ablated"]["ko_to_true"], result["n_ko"], a["pair"]["true"],
                 result["control_ablated"]["ko_to_true"])


def attribute_pairs(analyses: list[dict], ctx: dict, extract_meta: dict,
                    bundle=None, image_tensor=None) -> tuple[dict[int, dict], str]:
    """Relevance of every neuron to the wrong and the right class of the first
    ``attribute_images`` misclassified images (by id) of each analysed pair, for the atlas
    (common/attribution.py). Returns the records by image id, and why there are none when the
    model could not be run ("" otherwise): the reports do not depend on it."""
    settings: Settings = ctx["settings"]
    jobs = []
    for a in analyses:  # a["ko_ids"]: the pair's KO images, by id (``split_ok_ko``)
        t, p = int(a["pair"]["true_idx"]), int(a["pair"]["pred_idx"])
        jobs += [(int(i), ctx["paths"][int(i)], p, t)
                 for i in a["ko_ids"][:settings.attribute_images]]
    if not jobs:
        return {}, ""
    from common.attribution import attribute_images
    try:
        if bundle is None:
            bundle = load_run_model(extract_meta, device=settings.device,
                                    **settings.model_again())
        records = attribute_images(bundle, ctx["layers"], jobs, settings.batch_size,
                                   top=settings.why_neurons, load=image_tensor)
    except (StageError, OSError, RuntimeError, ValueError) as err:
        error = f"No relevance computed: the model could not be run ({err})."
        log.warning("%s", error)
        return {}, error
    log.info("08: relevance of %d misclassified images to their wrong and right classes",
             len(records))
    return records, ""


def remove_stale_reports(out_dir: Path, keep: set[str], upstream: dict) -> None:
    """Delete pair folders of an earlier run (recognised by their report.md) that were made from
    other inputs than ``upstream`` (the lineage recorded in their pair.json). Reports of other
    pairs made from the same inputs stay: `make debug TRUE=a PRED=b` adds a pair to them."""
    for child in sorted(out_dir.iterdir()):
        if (not child.is_dir() or child.name in keep
                or not doc.report_paths(child)[0].exists()):
            continue
        try:
            same = artefacts.read_pair_record(child).get("upstream") == upstream
        except (OSError, ValueError):
            same = False
        if not same:
            log.info("removing %s: it was made from other inputs", child)
            shutil.rmtree(child)


def write_unlabelled_note(run: artefacts.Run, metas: list, args: dict | None) -> dict:
    """An image set without labels has no errors to debug: write an empty confusion table and a
    short note saying so and how to give labels, instead of failing the run."""
    run.debug.mkdir(parents=True, exist_ok=True)
    note = (f"# Nothing to debug\n\nNo image in {run.predictions} has a label that names a class of "
            f"the model, so no misclassification can be found. Give labelled images (class "
            f"sub-folders, or a `label` column in the CSV list), with CLASSES=names.txt if the "
            f"labels are class names the model does not carry.\n")
    write_text(run.debug_note, note)
    artefacts.write_pairs(run.pairs, [])
    artefacts.write_confusion(run.confusion, [])
    remove_stale_reports(run.debug, set(), {})
    write_meta(run.meta(STAGE), STAGE, args or {},
               outputs=[run.confusion, run.debug_note], inputs=metas, pairs=[])
    log.warning("no labelled image: nothing to debug (see %s)", run.debug_note)
    return {"pairs": [], "causal": {}}


def run(run: artefacts.Run, settings: Settings = Settings(), *, bundle=None, image_tensor=None,
        args: dict | None = None) -> dict:
    """Write the run's confusion table and a debug report per selected pair; return a summary.

    ``bundle`` (a common.models.ModelBundle or look-alike) and ``image_tensor``
    (path → input tensor; default: common.rerun.image_loader) are loaded here only when not
    injected; they are needed only for the causal check
    (``settings.ablate_top`` > 0) and the relevances (``settings.attribute_images`` > 0).
    """
    predictions, stats_dir, activations = run.predictions, run.stats, run.activations
    descriptions, mosaics = run.descriptions, run.mosaics
    out_dir, confusion_path = run.debug, run.confusion
    if settings.pred and not settings.true:
        raise StageError("--pred needs --true (the class whose images are misclassified)")

    extract_meta = read_meta(predictions)
    metas = [extract_meta, read_meta(activations), read_meta(stats_dir)] + \
        [read_meta(p) for p in (descriptions, mosaics) if p.exists()]
    merge_lineage(metas)  # refuse, before any work, inputs that come from different runs
    meta_file = run.meta(STAGE)
    sweep_temporaries(out_dir, confusion_path.parent)  # what a killed earlier run left behind
    retract_meta(meta_file)  # outputs are replaced from here on
    rows, paths = read_predictions(predictions)
    if not rows:
        return write_unlabelled_note(run, metas, args)
    names = class_names(rows, extract_meta.get("classes"))
    confusion = confusion_table(rows, names)
    conf_by_idx = {r["class_idx"]: r for r in confusion}
    for r in confusion[:5]:
        log.info("problem class %d: %s — accuracy %.1f%%, %d errors, top: %s", r["rank"],
                 r["class"], 100 * r["accuracy"], r["errors"], r["top_confused"] or "-")

    if settings.true:
        pairs = [explicit_pair(rows, names, settings.true, settings.pred)]
    else:
        pairs = select_pairs(rows, names, settings.min_errors, settings.min_share,
                             settings.min_images, settings.max_pairs)
    chosen = [p for p in pairs if p["status"] in artefacts.ANALYSED]
    if not settings.true and chosen and chosen[0]["status"] == "fallback":
        log.warning("no confusion passes the thresholds; analysing the most frequent one instead: "
                    "%s → %s (%d KO)", chosen[0]["true"], chosen[0]["pred"], chosen[0]["ko"])
    if not chosen:
        log.warning("no confusion has at least %d OK and %d KO images: no pair is analysed "
                    "(see %s)", settings.min_images, settings.min_images, run.pairs)

    ctx = {"settings": settings, "stats_dir": stats_dir, "activations": activations,
           "descriptions": artefacts.description_texts(
               artefacts.read_descriptions(descriptions, required=False)),
           "mosaics": {m.key: m.path for m in artefacts.read_mosaics(mosaics, required=False)},
           "paths": paths,
           "shared_names": {n for n, c in collections.Counter(names.values()).items() if c > 1}}
    ctx["layers"], input_size, _ = artefacts.read_activations(activations, layers=())
    ctx["input_size"] = input_size[0]
    ctx["channels"] = int((extract_meta.get("preprocess") or {}).get("channels", 3))
    out_dir.mkdir(parents=True, exist_ok=True)
    analyses = [a for a in (analyse_pair(p, rows, ctx, run) for p in chosen) if a is not None]

    model_name = (extract_meta.get("model") or {}).get("name", "?")
    if analyses and settings.ablate_top > 0:
        if bundle is None:
            bundle = load_run_model(extract_meta, device=settings.device,
                                    **settings.model_again())
        model_name = getattr(bundle, "name", model_name)
        run_causal(analyses, rows, ctx, bundle, image_tensor)
    attributions, attribution_error = attribute_pairs(analyses, ctx, extract_meta, bundle,
                                                      image_tensor)

    outputs = [confusion_path, run.pairs]
    for a in analyses:
        a["why_ids"] = write_why(a, attributions, ctx)
        a["why"] = artefacts.read_why(a["files"].why) if a["why_ids"] else None
        report_ctx = {**ctx, **a, "model_name": model_name, "attribution_error": attribution_error,
                      "confusion_row": conf_by_idx[a["pair"]["true_idx"]]}
        blocks = report_blocks(a["pair"], report_ctx)
        md, _ = doc.write_report(a["folder"], f"{a['pair']['true']} → {a['pair']['pred']}",
                                 blocks)
        artefacts.write_report_blocks(a["files"].blocks, blocks)
        outputs += [a["files"].neurons, md, a["files"].blocks]
        if a["why_ids"]:
            outputs.append(a["files"].why)
    # The runs a report is made from.
    upstream = {stage: fp for stage, fp in merge_lineage(metas).items()
                if stage in ("01_extract", "02_mosaics", "03_describe")}
    for a in analyses:
        write_json(a["files"].record, {"pair": a["pair"], "upstream": upstream})
    remove_stale_reports(out_dir, {a["folder"].name for a in analyses}, upstream)
    attributions_path = run.attributions
    if attributions:
        artefacts.write_attributions(attributions_path, ctx["layers"], attributions,
                                     settings.attribute_images)
        outputs.append(attributions_path)
    else:
        attributions_path.unlink(missing_ok=True)  # an earlier run's: not of these inputs
    run.debug_note.unlink(missing_ok=True)  # an unlabelled earlier run's note
    artefacts.write_pairs(run.pairs, pairs)
    artefacts.write_confusion(confusion_path, confusion)
    summary = {"pairs": [{k: a["pair"][k] for k in ("true", "pred", "ok", "ko", "status", "folder")}
                         for a in analyses],
               "causal": {a["pair"]["folder"]: a.get("causal") for a in analyses}}
    write_meta(meta_file, STAGE, args or {}, outputs=outputs,
               inputs=metas, pairs=summary["pairs"], attributed_images=len(attributions),
               attribution_error=attribution_error)
    log.info("08: %d classes in %s; %d pair(s) analysed in %s", len(confusion), confusion_path,
             len(analyses), out_dir)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of stage 08: ``--run`` and the fields of ``Settings``."""
    p = stage_parser(__doc__.split("\n")[0])
    add_run(p, "01's files, 02_mosaics.csv and 03_descriptions.csv",
            "08_confusion.csv and 08_debug/")
    add_settings(p, Settings)
    return p


@exit_on_stage_error
def main(argv=None):
    """Parse flags and run the debugging stage."""
    parser = build_parser()
    args = start_stage(parser, argv, keep_memory=True)
    if not 0 < args.fdr < 1:
        parser.error("--fdr must lie between 0 and 1")
    if args.min_images < 2:
        parser.error("--min-images must be at least 2 (a variance needs two images)")
    run(artefacts.Run(args.run), settings_from(Settings, args), args=vars(args))


if __name__ == "__main__":
    main()
