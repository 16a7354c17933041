"""Stage 11 — baskets (Neurobasket, seed 002): sets of neurons of a layer, each tied to a group
of images, with a name, its place in a hierarchy, union / difference, and the paper's two tests.

Reads (see ARTEFACTS.md) 01_activations.npz (layers), 01_stats/<layer>.mean.npy and .max.npy
(memory-mapped), 01_images.csv, 01_predictions.csv (labels and predictions: names, purity and
the labelled images for pruning), 01_extract.meta.json (the model), 03_descriptions.csv (each
layer's abstraction level, for the basket sentences).
Writes 11_baskets.csv (one row per basket), 11_tree.npz (the hierarchy), 11_consistency.csv
(Table 1: activation consistency against random-index sets), 11_pruning.csv (Table 2: Δprob_y
of pruning the baskets named after class y, against random baskets and random-index sets),
11_baskets/ (mosaics, their index, 03's sentences) and 11_baskets.meta.json.

Two ways to find baskets (``--method``, ``make baskets BASKETS=…``; common/baskets.py):
- ``finch`` (default, the paper's): FINCH clusters each layer's images by their features (01's
  per-image channel means) into levels, fine to coarse; clusters pass four filters (cohesion,
  purity of their predictions, the Davies–Bouldin ratio, levels with more clusters than the run
  has classes); each kept cluster is a basket, filled with the neurons active (A ≥ μ(x) + α σ(x))
  on at least β of its images. Its name comes from its images' labels and predictions; its
  sentence from 03's describer run on the mosaic of its images (a VLM when 03 is given one).
- ``corr``: neurons grouped by the correlation of their per-image maxima, average linkage cut
  at ``--min-corr``; the images are those the members fire on jointly.

Union and difference of two baskets (after a build; any two, of any layers):
  python 11_baskets.py --run data/demo --union _blocks.15:b1 _blocks.15:b2
  python 11_baskets.py --run data/demo --difference _blocks.8:b4 _blocks.8:b9
print the members, the images that activate the set jointly, what those images are (their
labels and predictions) and the sentences of both baskets and of the set (03 run on the set's
mosaic), and keep them in 11_sets/<op>__<A>__<B>/. With ``corr`` baskets, any node of a layer's
tree can be named too, ``<layer>:n<node>``.

Example (build):
  python 11_baskets.py --run data/demo --describe-args "--backend offline"
"""
from __future__ import annotations

import argparse
import collections
from dataclasses import dataclass
import logging
import os
import re
from pathlib import Path

import numpy as np

from common.artefacts import (BasketRow, ConsistencyRow, DescribedMosaics, Mosaic, PruningRow, Run,
                              columns, layer_dir, layer_slug)
from common.cli import (ModelAgain, StageError, add_run, add_settings, exit_on_stage_error,
                        setting, settings_from, stage_parser, start_stage)
from common.describers import DescriberSettings, describe_index, parse_describe_args
from common.io import save_npz, sweep_temporaries, write_bytes, write_csv, write_json
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta

log = logging.getLogger("neuron-atlas.11_baskets")

STAGE = "11_baskets"
BASKET_FIELDS = columns(BasketRow)  # the readers' own columns, in file order
CONSISTENCY_FIELDS = columns(ConsistencyRow)
PRUNE_FIELDS = columns(PruningRow)
INDEX_FIELDS = [c for c in columns(Mosaic) if c != "ranks"]  # 02's index columns
SAMPLE_CAP = 10_000  # baskets drawn per repeat for Table 1 at most (the paper's 10,000)


@dataclass(frozen=True)
class Settings(ModelAgain):
    """Stage 11's settings: one flag each, defaults written here only (the model to prune with
    is named again by ``ModelAgain``'s fields)."""

    method: str = setting("finch", "finch: the paper's baskets (FINCH clusters of images, filled "
                          "with their active neurons); corr: neurons grouped by correlation",
                          make="BASKETS", choices=("finch", "corr"))
    alpha: float = setting(3.0, "finch: a neuron is active on an image when its activation is "
                           "≥ μ + α σ of the layer's neurons on that image (Eq. 2)",
                           make="BASKET_ALPHA")
    beta: float = setting(0.75, "finch: a basket holds the neurons active on at least this "
                          "share of its images (Eq. 4)", make="BASKET_BETA")
    min_images: int = setting(5, "finch: image clusters smaller than this are no basket")
    min_corr: float = setting(0.5, "corr: groups are joined while their members correlate at "
                              "least this much on average", make="MIN_CORR")
    grid: int = setting(10, "mosaic tiles per side", make="GRID")
    tile: int = setting(64, "mosaic tile side (px)", make="TILE")
    describe_args: str = setting("--backend offline", "03's describer flags (03_describe.py "
                                 "--help) for the basket sentences (make passes the run's)")
    prune: int = setting(5, "baskets named after a class pruned per class and repeat (0: no "
                         "pruning)", make="PRUNE")
    repeats: int = setting(5, "seeded repeats of the random draws of both tests (mean ± std)",
                           make="REPEATS")
    prune_images: int = setting(40, "labelled images per class used by the pruning check",
                                make="PRUNE_IMAGES")
    seed: int = setting(0, "seed of the image sample and the random draws")
    batch_size: int = setting(32, "images per forward pass", make="BATCH")
    device: str = setting("auto", "auto (cuda if present), cpu, cuda …", make="DEVICE")


# ---------------------------------------------------------------------------------------------
# Reading the run


def layer_levels(descriptions: Path) -> dict[str, int]:
    """The abstraction level 03 gave each layer (1 where 03 has not run)."""
    if not descriptions.is_file():
        return {}
    from common.artefacts import read_descriptions
    return {r.layer: r.level or 1 for r in read_descriptions(descriptions)}


@dataclass
class ImageFacts:
    """What 01 knows of each image, by image id: its label (under the model's name for that
    class when 01 saw the model predict it, else the dataset's text), its predicted class and its
    top-5 prediction as a vector (the offline stand-in for a caption)."""

    labels: dict[int, str]
    predicted: dict[int, str]
    top5: dict[int, tuple[tuple[int, ...], tuple[float, ...]]]
    n_classes: int

    @classmethod
    def read(cls, predictions: Path) -> "ImageFacts":
        """From 01_predictions.csv (``common.artefacts.read_predictions``)."""
        from common.artefacts import read_predictions
        rows = read_predictions(predictions) if predictions.is_file() else []
        names = {r.pred_idx: r.pred_name for r in rows if r.pred_name}  # the model's names
        labels = {r.image_id: names.get(r.label_idx) or r.label or str(r.label_idx)
                  for r in rows if r.label_idx >= 0}
        return cls(labels=labels, predicted={r.image_id: r.pred_name for r in rows},
                   top5={r.image_id: (r.top5_idx, r.top5_prob) for r in rows},
                   n_classes=len(set(labels.values())))

    def vectors(self, ids) -> np.ndarray:
        """Each image's top-5 class probabilities as one row over the classes seen."""
        width = 1 + max((max(i) for i, _ in self.top5.values() if i), default=0)
        out = np.zeros((len(ids), width))
        for row, image_id in enumerate(ids):
            idx, prob = self.top5.get(int(image_id), ((), ()))
            out[row, list(idx)] = prob
        return out

    def name(self, ids) -> str:
        """A basket's offline name: what most of its images are labelled and predicted as."""
        parts = []
        for what, table in (("labelled", self.labels), ("predicted", self.predicted)):
            seen = [table[int(i)] for i in ids if int(i) in table]
            if seen:
                counts = collections.Counter(seen)
                top = min(counts, key=lambda k: (-counts[k], k))  # ties: the first by name
                count = counts[top]
                parts.append(f"{what} {top} ({count} of {len(seen)})")
        return "; ".join(parts) or "images without labels or predictions"


def mentions(text: str, class_name: str) -> bool:
    """Whether ``text`` names the class (its name before any comma, whole words, any case);
    the counts in brackets of a basket's name are not read."""
    name = class_name.split(",")[0].strip()
    text = re.sub(r"\([^)]*\)", " ", text)
    return bool(name) and re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.I) is not None


# ---------------------------------------------------------------------------------------------
# Mosaics and sentences


def image_mosaic(ids: np.ndarray, paths: list[str], grid: int, tile: int,
                 cache: dict[int, np.ndarray]) -> tuple[bytes, int]:
    """PNG of the images ``ids`` (best first) as whole-image tiles; ``cache`` keeps decoded tiles.

    A basket has no single position to crop around (its members peak in different places), so
    each tile is the whole network input, shrunk.
    """
    from common.images import BadImage, load_rgb, network_input
    from common.mosaics import paste_tiles, png_bytes

    def tile_of(i: int):
        """The tile of image ``i`` (None if it no longer loads)."""
        if i not in cache:
            try:
                cache[i] = np.asarray(network_input(load_rgb(paths[i])[0], tile))
            except (BadImage, OSError) as err:
                log.warning("image %d left out of a basket mosaic: %s", i, err)
                cache[i] = None
        return cache[i]

    mosaic, placed = paste_tiles(((rank, tile_of(int(i))) for rank, i in
                                  enumerate(ids[:grid * grid])), grid, tile)
    return png_bytes(mosaic), placed


def describe_mosaics(rows: list[dict], folder: Path, describer: DescriberSettings,
                     levels: dict[str, int], metas: list[dict], describe=None
                     ) -> dict[tuple[str, int], str]:
    """Write the mosaic index ``rows`` (and its meta, made from ``metas``) in ``folder`` and have
    the run's describer (``describer``: 03's settings) describe them."""
    files = DescribedMosaics(folder)
    write_csv(files.index, rows, INDEX_FIELDS)
    write_meta(files.meta, "11_mosaics", {}, outputs=[files.index], inputs=metas,
               n_mosaics=len(rows))
    return (describe or describe_index)(files.index, files.descriptions, describer, levels)


# ---------------------------------------------------------------------------------------------
# Finding baskets


def finch_baskets(layer: str, means: np.ndarray, ids: np.ndarray, facts: ImageFacts,
                  settings: Settings, skipped: dict) -> tuple[list[dict], np.ndarray]:
    """The paper's baskets of one layer: FINCH levels of the images ``ids`` (rows of ``means``,
    N × C channel means), the four filters, Eq. 1–4. Returns the baskets (each with its image
    rows, ``rows``) and the partitions (N × levels). ``skipped`` counts the clusters left out,
    by reason."""
    from common.baskets import (active_neurons, davies_bouldin_ratios, image_hierarchy,
                                neuron_set, outliers, purity, silhouettes)
    parts = image_hierarchy(means)
    active = active_neurons(means, settings.alpha)
    vectors = facts.vectors(ids)
    unit = means / np.where((n := np.linalg.norm(means, axis=1, keepdims=True)) > 0, n, 1.0)
    found = []
    for level in range(parts.shape[1]):
        labels = parts[:, level]
        clusters = np.unique(labels)
        # (iv) a level is read while it has more clusters than the run has classes
        if len(clusters) < 2 or len(clusters) <= facts.n_classes:
            skipped["levels with too few clusters"] += 1
            continue
        sil = silhouettes(means, labels)
        ratio = davies_bouldin_ratios(means, labels)
        scores = []
        for k in clusters:
            rows = np.flatnonzero(labels == k)
            known = rows[np.abs(vectors[rows]).sum(axis=1) > 0]  # images with a prediction
            scores.append((int(k), rows, float(sil[rows].mean()),
                           purity(vectors[known]) if len(known) else float("nan"),
                           ratio[int(k)]))
        cohesion_bad = outliers([c for _, _, c, _, _ in scores], high_is_bad=False)
        purity_bad = outliers([p for _, _, _, p, _ in scores], high_is_bad=False)
        ratio_bad = outliers([r for _, _, _, _, r in scores], high_is_bad=True)
        for i, (k, rows, coh, pur, rat) in enumerate(scores):
            reason = ("fewer images than --min-images" if len(rows) < settings.min_images else
                      "low cohesion" if cohesion_bad[i] else "low purity" if purity_bad[i] else
                      "high Davies–Bouldin ratio" if ratio_bad[i] else "")
            members = [] if reason else neuron_set(active[rows], settings.beta)[0]
            if not reason and not members:
                reason = "no neuron active on β of its images"
            if reason:
                skipped[reason] += 1
                continue
            centre = unit[rows].mean(axis=0)
            order = rows[np.argsort(-(unit[rows] @ centre), kind="stable")]  # typical first
            found.append({"layer": layer, "method": "finch", "level": level + 1, "cluster": k,
                          "channel_list": members, "rows": order, "cohesion": round(coh, 4),
                          "purity": round(pur, 4) if np.isfinite(pur) else "",
                          "db_ratio": round(rat, 4) if np.isfinite(rat) else ""})
    found.sort(key=lambda b: (b["level"], -len(b["rows"]), b["cluster"]))
    number = {(b["level"], b["cluster"]): i for i, b in enumerate(found, 1)}
    for i, b in enumerate(found, 1):
        b["number"] = i
        up = b["level"]  # the next level's column (0-based) holds the parent cluster
        parent = parts[b["rows"][0], up] if up < parts.shape[1] else -1
        b["parent"] = number.get((up + 1, int(parent)), -1)
    return found, parts


def corr_baskets(layer: str, maxima: np.ndarray, settings: Settings
                 ) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The correlation baskets of one layer (rows: every image of 01_stats) and its tree."""
    from common.baskets import cluster, correlation, joint_images
    corr = correlation(maxima)
    tree, found = cluster(corr, settings.min_corr)
    out = []
    for b in found:
        ids, _, _ = joint_images(np.asarray(maxima[:, b.members]),
                                 settings.grid * settings.grid)
        out.append({"layer": layer, "method": "corr", "level": 0, "cluster": b.node,
                    "number": b.number, "parent": b.parent, "channel_list": b.members,
                    "rows": ids, "cohesion": round(b.cohesion, 4), "purity": "",
                    "db_ratio": ""})
    return out, {f"{layer}/linkage": tree, f"{layer}/correlation": corr.astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# The paper's two tests


def consistency_table(baskets: list[dict], profiles: dict[str, np.ndarray],
                      channels: dict[str, int], repeats: int, seed: int) -> list[dict]:
    """Table 1: per layer and over all, the mean activation consistency (Eq. 5) of baskets drawn
    with replacement (as many as there are, at most 10,000) and of random-index sets of the same
    sizes on the same images, ``repeats`` seeded draws, mean ± std. ``profiles``: a layer's
    channel means, rows as the baskets' ``rows``. Baskets of one neuron have no pair: left out."""
    from common.baskets import consistency
    usable = [b for b in baskets if len(b["channel_list"]) >= 2]
    groups = [(layer, [b for b in usable if b["layer"] == layer])
              for layer in dict.fromkeys(b["layer"] for b in usable)]
    if len(groups) > 1:
        groups.append(("all", usable))
    table = []
    for layer, mine in groups:
        ours, chance = [], []
        for r in range(repeats):
            rng = np.random.default_rng([seed, r])
            drawn = rng.choice(len(mine), size=min(len(mine), SAMPLE_CAP), replace=True)
            ours.append(np.mean([mine[i]["consistency"] for i in drawn]))
            chance.append(np.mean([consistency(np.asarray(
                profiles[mine[i]["layer"]][mine[i]["rows"]])[:, rng.choice(
                    channels[mine[i]["layer"]], len(mine[i]["channel_list"]), replace=False)])
                for i in drawn]))
        table.append({"layer": layer, "n_baskets": len(mine),
                      "mean_size": round(float(np.mean([len(b["channel_list"]) for b in mine])), 2),
                      "consistency": round(float(np.mean(ours)), 4),
                      "consistency_sd": round(float(np.std(ours)), 4),
                      "random_index": round(float(np.mean(chance)), 4),
                      "random_index_sd": round(float(np.std(chance)), 4), "repeats": repeats})
    return table


def prune_by_class(baskets: list[dict], channels: dict[str, int], run: Run, settings: Settings,
                   bundle=None) -> list[dict]:
    """Table 2: for each labelled class y with baskets whose name or sentence mentions it, zero
    ``settings.prune`` of them (a seeded draw), one at a time, on y's labelled images and take
    Δprob_y = mean(p_pruned(y|x) − p(y|x)); beside as many random other baskets and random-index
    sets of the same sizes. ``settings.repeats`` draws: mean ± std, per class and (class_idx −1)
    over the classes. ``bundle`` replaces the model the settings name again (tests)."""
    from common.artefacts import read_predictions
    from common.rerun import class_name, labelled_images, load_run_model, predict
    bundle = bundle or load_run_model(read_meta(run.activations), device=settings.device,
                                      **settings.model_again())
    images = labelled_images(read_predictions(run.predictions), bundle, settings.prune_images,
                             settings.seed)
    if not images.ids:
        raise StageError("no labelled image could be loaded for pruning")
    before = predict(bundle, images, None, settings.batch_size, "11 unpruned")
    cache: dict = {}

    def delta(label: int, layer: str, members) -> float:
        """Δprob of class ``label`` on its images with ``members`` of ``layer`` zeroed."""
        key = (label, layer, tuple(sorted(int(m) for m in members)))
        if key not in cache:
            mask = images.labels == label
            probs = predict(bundle, images.select(mask), {layer: list(key[2])},
                            settings.batch_size, f"11 prune {layer}")
            cache[key] = float((probs[:, label] - before[mask, label]).mean())
        return cache[key]

    rows, overall = [], collections.defaultdict(lambda: collections.defaultdict(list))
    for label in sorted(set(images.labels.tolist())):
        names = {class_name(bundle, images, label), images.class_names.get(label, "")}
        named = [b for b in baskets if any(mentions(f"{b['name']} {b.get('description', '')}", n)
                                           for n in names)]
        if not named:
            continue
        others = [b for b in baskets if b not in named]
        runs = collections.defaultdict(list)
        for r in range(settings.repeats):
            rng = np.random.default_rng([settings.seed, r, label])
            picked = [named[i] for i in rng.choice(len(named), min(settings.prune, len(named)),
                                                   replace=False)]
            runs["basket"].append(np.mean([delta(label, b["layer"], b["channel_list"])
                                           for b in picked]))
            runs["random_index"].append(np.mean([delta(label, b["layer"], rng.choice(
                channels[b["layer"]], len(b["channel_list"]), replace=False)) for b in picked]))
            if others:
                drawn = rng.choice(len(others), len(picked), replace=len(others) < len(picked))
                runs["random_basket"].append(np.mean([delta(
                    label, others[i]["layer"], others[i]["channel_list"]) for i in drawn]))
            for kind, values in runs.items():
                overall[kind][r].append(values[-1])
        mask = images.labels == label
        rows.append(table_row(runs, settings.repeats, class_idx=label,
                              class_name=class_name(bundle, images, label),
                              n_images=int(mask.sum()), n_baskets=len(named),
                              pruned=" ".join(b["basket"] for b in named),
                              p_before=round(float(before[mask, label].mean()), 4)))
    if len(rows) > 1:
        per_repeat = {kind: [np.mean(by_r[r]) for r in sorted(by_r)]
                      for kind, by_r in overall.items()}
        rows.append(table_row(per_repeat, settings.repeats, class_idx=-1,
                              class_name="all classes above",
                              n_images=sum(r["n_images"] for r in rows),
                              n_baskets=sum(r["n_baskets"] for r in rows), pruned="",
                              p_before=round(float(np.mean([r["p_before"] for r in rows])), 4)))
    return rows


def table_row(runs: dict[str, list[float]], repeats: int, **fields) -> dict:
    """A row of 11_pruning.csv: ``fields`` and, per kind of pruned set, the mean and std of its
    Δprob over the repeats (empty where there was nothing to draw)."""
    for kind in ("basket", "random_basket", "random_index"):
        values = runs.get(kind, [])
        fields[f"delta_{kind}"] = round(float(np.mean(values)), 4) if values else ""
        fields[f"delta_{kind}_sd"] = round(float(np.std(values)), 4) if values else ""
    return dict(fields, repeats=repeats)


# ---------------------------------------------------------------------------------------------
# Build


def build(run: Run, settings: Settings = Settings(), describe=None, bundle=None,
          args: dict | None = None) -> dict:
    """Find, name and describe the baskets of every layer of ``run`` and run the two tests.

    ``describe`` (like ``common.describers.describe_index``) and ``bundle`` (the model) replace the
    ones this function would use — tests pass small ones. Returns {"baskets", "consistency",
    "pruning"} rows.
    """
    from common.artefacts import read_activations, read_images, read_stats
    from common.baskets import consistency, random_baskets
    describer = parse_describe_args(settings.describe_args)  # refused before any work
    if not (0 < settings.beta <= 1) or settings.repeats < 1:
        raise StageError(f"--beta {settings.beta} / --repeats {settings.repeats}: β is a share "
                         "in (0, 1] and at least one repeat is needed")
    grid, tile, seed = settings.grid, settings.tile, settings.seed
    run_dir = run.folder
    retract_meta(run.meta(STAGE))  # not done until the new meta is written
    sweep_temporaries(run.basket_dir)
    metas = [read_meta(run.activations), read_meta(run.stats)]
    if run.descriptions.is_file():
        metas.append(read_meta(run.descriptions))
    merge_lineage(metas)  # refuse 03 sentences of another run's mosaics
    layers, _, tops = read_activations(run.activations)
    paths = [r.path for r in read_images(run.images)]
    facts = ImageFacts.read(run.predictions)
    levels = layer_levels(run.descriptions)
    folder = run.basket_dir
    folder.mkdir(parents=True, exist_ok=True)
    channels = {layer: tops[layer].channels for layer in layers}
    baskets, trees, index_rows, cache, profiles = [], {}, [], {}, {}
    skipped = collections.Counter()
    for layer in layers:
        means = np.asarray(read_stats(run.stats, layer, "mean"), dtype=np.float64)
        usable = np.flatnonzero(np.isfinite(means).all(axis=1))
        if settings.method == "finch":
            found, parts = finch_baskets(layer, means[usable], usable, facts, settings, skipped)
            trees[f"{layer}/partitions"] = parts
            trees[f"{layer}/image_ids"] = usable
            profiles[layer] = means[usable]
            for b in found:  # rows: of profiles[layer]
                b["ids"] = usable[b["rows"]]
        else:
            found, tree = corr_baskets(layer, read_stats(run.stats, layer, "max"), settings)
            trees.update(tree)
            profiles[layer] = means
            for b in found:
                b["ids"] = b["rows"]
        log.info("%s: %d baskets (%s)", layer, len(found), settings.method)
        for b in found:
            members = b["channel_list"]
            b["consistency"] = consistency(profiles[layer][b["rows"]][:, members])
            chance = [consistency(profiles[layer][b["rows"]][:, r]) for r in
                      random_baskets(channels[layer], len(members), settings.repeats,
                                     seed + b["number"])] if len(members) >= 2 else []
            png, placed = image_mosaic(b["ids"], paths, grid, tile, cache)
            mosaic = layer_dir(folder, layer) / f"b{b['number']}.png"
            write_bytes(mosaic, png)
            index_rows.append({"layer": f"{layer}:basket", "channel": b["number"],
                               "path": os.path.relpath(mosaic, folder), "n_tiles": placed,
                               "grid": grid, "tile_px": tile, "crop": "image"})
            b.update(basket=f"{layer}:b{b['number']}", size=len(members),
                     members=" ".join(map(str, members)), n_images=len(b["ids"]),
                     random_consistency=round(float(np.mean(chance)), 4) if chance else "",
                     top_images=" ".join(map(str, b["ids"][:10])), name=facts.name(b["ids"]),
                     mosaic=os.path.relpath(mosaic, run_dir))
            b["consistency"] = round(b["consistency"], 4) if len(members) >= 2 else ""
            baskets.append(b)
    sentences = {}
    if index_rows:
        sentences = describe_mosaics(index_rows, folder, describer,
                                     {f"{layer}:basket": levels.get(layer, 1) for layer in layers},
                                     metas, describe)
    for b in baskets:
        b["description"] = sentences.get((f"{b['layer']}:basket", b["number"]), "")
    table1 = consistency_table(baskets, profiles, channels, settings.repeats, seed)
    pruning = (prune_by_class(baskets, channels, run, settings, bundle)
               if settings.prune > 0 and baskets else [])
    save_npz(run.tree, trees)
    write_csv(run.baskets, baskets, BASKET_FIELDS)
    write_csv(run.consistency, table1, CONSISTENCY_FIELDS)
    write_csv(run.pruning, pruning, PRUNE_FIELDS)
    write_meta(run.meta(STAGE), STAGE, dict(args or {}),
               outputs=[run.baskets, run.tree, run.consistency, run.pruning], inputs=metas,
               method=settings.method, alpha=settings.alpha, beta=settings.beta,
               min_corr=settings.min_corr, n_baskets=len(baskets), skipped=dict(skipped))
    return {"baskets": baskets, "consistency": table1, "pruning": pruning}


# ---------------------------------------------------------------------------------------------
# Union and difference


def baskets_by_name(path: Path) -> dict[str, dict]:
    """11_baskets.csv (read by common.artefacts) by basket name: members as (layer, channel)
    pairs and the basket's sentence."""
    from common.artefacts import read_baskets
    if not path.is_file():
        raise StageError(f"{path} not found: build the baskets first (make baskets)")
    return {row.basket: {"member_set": {(row.layer, c) for c in row.members},
                         "description": " — ".join(t for t in (row.name, row.description) if t)}
            for row in read_baskets(path)}


def tree_node(tree_path: Path, name: str, baskets_path: Path) -> dict:
    """A node of a ``corr`` layer's tree named ``<layer>:n<node>`` (scipy's numbering, that of
    11_baskets.csv's ``cluster`` and ``parent`` there) as a basket-like dict: its leaves are its
    members, no sentence.

    Baskets of one cut never share neurons, so set operations become informative between nested
    nodes: a parent minus one of its baskets leaves what the sibling adds.
    """
    from scipy.cluster.hierarchy import to_tree
    from common.artefacts import read_basket_tree
    layer, _, node = name.rpartition(":")
    trees = read_basket_tree(tree_path)
    if not node.startswith("n") or not node[1:].isdigit() or f"{layer}/linkage" not in trees:
        raise StageError(f"no basket {name!r} in {baskets_path}, and it names no tree node "
                         f"(<layer>:n<node>: a node of a corr basket tree)")
    _, nodes = to_tree(trees[f"{layer}/linkage"], rd=True)
    if int(node[1:]) >= len(nodes):
        raise StageError(f"{name}: the tree of {layer} has nodes 0 … {len(nodes) - 1}")
    leaves = nodes[int(node[1:])].pre_order()
    return {"member_set": {(layer, int(c)) for c in leaves}, "description": ""}


def set_operation(run: Run, op: str, a: str, b: str, settings: Settings = Settings(),
                  describe=None) -> dict:
    """Members, joint images and sentences of ``a ∪ b`` or ``a \\ b`` (``op``: union |
    difference); kept in 11_sets/<op>__<a>__<b>/set.json and printed by ``main``."""
    from common.artefacts import read_images, read_stats
    from common.baskets import joint_images
    describer = parse_describe_args(settings.describe_args)  # refused before any work
    grid, tile = settings.grid, settings.tile
    baskets = baskets_by_name(run.baskets)
    read_meta(run.tree)
    for name in (a, b):
        if name not in baskets:
            baskets[name] = tree_node(run.tree, name, run.baskets)
    members = (baskets[a]["member_set"] | baskets[b]["member_set"] if op == "union"
               else baskets[a]["member_set"] - baskets[b]["member_set"])
    members = sorted(members)
    folder = run.basket_sets / layer_slug(f"{op}__{a}__{b}")
    folder.mkdir(parents=True, exist_ok=True)
    result = {"operation": op, "a": a, "b": b,
              "members": [f"{layer}:{c}" for layer, c in members],
              "a_description": baskets[a]["description"],
              "b_description": baskets[b]["description"], "images": [], "description": ""}
    if members:
        layers = sorted({layer for layer, _ in members})
        columns = np.concatenate([np.asarray(read_stats(run.stats, layer, "max")[
            :, [c for ly, c in members if ly == layer]]) for layer in layers], axis=1)
        ids, _, hits = joint_images(columns, grid * grid)
        paths = [r.path for r in read_images(run.images)]
        png, placed = image_mosaic(ids, paths, grid, tile, {})
        write_bytes(folder / "mosaic.png", png)
        level = layer_levels(run.descriptions).get(members[0][0], 1)
        sentences = describe_mosaics([{"layer": "set", "channel": 1, "path": "mosaic.png",
                                       "n_tiles": placed, "grid": grid, "tile_px": tile,
                                       "crop": "image"}], folder, describer,
                                     {"set": level}, [read_meta(run.baskets)], describe)
        result.update(images=[int(i) for i in ids], joint_hits=hits,
                      image_paths=[paths[int(i)] for i in ids[:10]],
                      name=ImageFacts.read(run.predictions).name(ids),
                      description=sentences.get(("set", 1), ""),
                      mosaic=str(folder / "mosaic.png"))
    write_json(folder / "set.json", result)
    return result


def format_set(result: dict) -> str:
    """The set as text for the terminal."""
    sign = "∪" if result["operation"] == "union" else "∖"
    lines = [f"{result['a']} {sign} {result['b']}: {len(result['members'])} neurons",
             f"  {result['a']}: {result['a_description']}",
             f"  {result['b']}: {result['b_description']}"]
    if not result["members"]:
        lines.append("  the set is empty: every neuron of the first basket is in the second")
        return "\n".join(lines)
    lines += [f"  the set's images: {result['name']}",
              f"  set: {result['description']}",
              f"  members: {' '.join(result['members'])}",
              f"  images firing jointly: {result['joint_hits']}; best: "
              f"{', '.join(result['image_paths'])}",
              f"  mosaic: {result['mosaic']}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags: ``--run``, the set operations and the fields of ``Settings``."""
    p = stage_parser(__doc__.split("\n\n")[0])
    add_run(p, "01's files and 03_descriptions.csv",
            "11_baskets.csv, 11_tree.npz, 11_consistency.csv, 11_pruning.csv, 11_baskets/ "
            "(11_sets/ for a set)")
    ops = p.add_mutually_exclusive_group()
    ops.add_argument("--union", nargs=2, metavar=("A", "B"), help="show the union of two baskets")
    ops.add_argument("--difference", nargs=2, metavar=("A", "B"),
                     help="show the neurons of A not in B")
    add_settings(p, Settings)
    return p


@exit_on_stage_error
def main(argv=None):
    """Build the baskets, or print the union / difference of two."""
    args = start_stage(build_parser(), argv, keep_memory=True)
    run, settings = Run(args.run), settings_from(Settings, args)
    if args.union or args.difference:
        op = "union" if args.union else "difference"
        a, b = args.union or args.difference
        print(format_set(set_operation(run, op, a, b, settings)))
        return
    result = build(run, settings, args=vars(args))
    for row in result["consistency"]:
        log.info("consistency %s: baskets %.3f ± %.3f, random index %.3f ± %.3f", row["layer"],
                 row["consistency"], row["consistency_sd"], row["random_index"],
                 row["random_index_sd"])
    for row in result["pruning"]:
        log.info("Δprob %s: baskets %s ± %s, random baskets %s ± %s, random index %s ± %s",
                 row["class_name"], row["delta_basket"], row["delta_basket_sd"],
                 row["delta_random_basket"], row["delta_random_basket_sd"],
                 row["delta_random_index"], row["delta_random_index_sd"])


if __name__ == "__main__":
    main()
