"""Stage 11 — baskets (Neurobasket): groups of neurons of a layer that fire together, what images
they fire on, a sentence for each, their place in the tree, union / difference, and pruning.

Reads (see ARTEFACTS.md) 01_activations.npz (layers), 01_stats/<layer>.max.npy (memory-mapped),
01_images.csv, 01_predictions.csv (labelled images for pruning), 01_extract.meta.json (the model),
03_descriptions.csv (each layer's abstraction level, for the basket sentences).
Writes 11_baskets.csv (one row per basket), 11_tree.npz (each layer's linkage matrix and its
correlation cut), 11_pruning.csv (per pruned basket and class: accuracy before / after, against
random baskets of the same size), 11_baskets/ (mosaics, their index, 03's sentences, one
dendrogram PNG per layer) and 11_baskets.meta.json.

Rule (common/baskets.py): neurons are clustered by the correlation of their per-image maxima,
average linkage on 1 − r, and two groups are joined while the mean correlation between their
members is ≥ --min-corr. Clusters of ≥ 2 neurons are baskets, numbered largest first per layer
(``<layer>:b1`` …).

Union and difference of two baskets (after a build; any two, of any layers):
  python 11_baskets.py --run data/demo --union _blocks.15:b1 _blocks.15:b2
  python 11_baskets.py --run data/demo --difference _blocks.8:n197 _blocks.8:b4
print the members, the images that activate the set jointly and the sentences of both baskets and
of the set (03 run on the set's mosaic), and keep them in 11_sets/<op>__<A>__<B>/. Besides
baskets, any node of a layer's tree can be named, ``<layer>:n<node>`` (e.g. a basket's parent).

Example (build):
  python 11_baskets.py --run data/demo --describe-args "--backend offline"
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
import logging
import os
from pathlib import Path

import numpy as np

from common.artefacts import Run, layer_dir, layer_slug
from common.cli import (ModelAgain, StageError, add_run, add_settings, exit_on_stage_error,
                        setting, settings_from, stage_parser, start_stage)
from common.describers import DescriberSettings, describe_index, parse_describe_args
from common.io import load_npz, save_npz, sweep_temporaries, write_bytes, write_csv, write_json
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta

log = logging.getLogger("neuron-atlas.11_baskets")

STAGE = "11_baskets"
BASKET_FIELDS = ["basket", "layer", "number", "size", "members", "cohesion", "random_cohesion",
                 "join_corr",
                 "node", "parent", "depth", "sibling_members", "joint_hits", "top_images",
                 "mosaic", "description"]
PRUNE_FIELDS = ["basket", "layer", "size", "class_idx", "class_name", "n_images",
                "accuracy_before", "accuracy_pruned", "accuracy_random", "accuracy_random_sd",
                "delta_pruned", "delta_random", "p_true_before", "p_true_pruned",
                "p_true_random", "controls"]
INDEX_FIELDS = ["layer", "channel", "path", "n_tiles", "grid", "tile_px", "crop"]


@dataclass(frozen=True)
class Settings(ModelAgain):
    """Stage 11's settings: one flag each, defaults written here only (the model to prune with
    is named again by ``ModelAgain``'s fields)."""

    min_corr: float = setting(0.5, "cut: groups are joined while their members correlate at "
                              "least this much on average", make="MIN_CORR")
    grid: int = setting(10, "mosaic tiles per side", make="GRID")
    tile: int = setting(64, "mosaic tile side (px)", make="TILE")
    describe_args: str = setting("--backend offline", "03's describer flags (03_describe.py "
                                 "--help) for the basket sentences (make passes the run's)")
    prune: int = setting(2, "largest baskets per layer pruned (0: none)", make="PRUNE")
    controls: int = setting(3, "random baskets of the same size pruned per basket",
                            make="CONTROLS")
    prune_images: int = setting(40, "labelled images per class used by the pruning check",
                                make="PRUNE_IMAGES")
    seed: int = setting(0, "seed of the image sample and controls")
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
    index = folder / "11_mosaics.csv"
    write_csv(index, rows, INDEX_FIELDS)
    write_meta(folder / "11_mosaics.meta.json", "11_mosaics", {}, outputs=[index], inputs=metas,
               n_mosaics=len(rows))
    return (describe or describe_index)(index, folder / "03_descriptions.csv", describer,
                                        levels)


# ---------------------------------------------------------------------------------------------
# Pruning


def prune_baskets(baskets: list[dict], channels: dict[str, int], run: Run, settings: Settings,
                  bundle=None) -> list[dict]:
    """Zero the ``settings.prune`` largest baskets of each layer, then as many random baskets of
    the same size (``settings.controls`` each, seeded) and report per-class accuracy changes.
    ``bundle`` replaces the model the settings name again — tests pass a small one."""
    from common.artefacts import read_predictions
    from common.baskets import random_baskets
    from common.rerun import (class_name, labelled_images, load_run_model,
                              per_class as class_stats, predict)
    n_controls, seed, batch_size = settings.controls, settings.seed, settings.batch_size
    chosen = [b for b in baskets if b["number"] <= settings.prune]
    if not chosen:
        return []
    bundle = bundle or load_run_model(read_meta(run.activations), device=settings.device,
                                      **settings.model_again())
    images = labelled_images(read_predictions(run.predictions), bundle, settings.prune_images,
                             seed)
    if not images.ids:
        raise StageError("no labelled image could be loaded for pruning")
    before = class_stats(predict(bundle, images, None, batch_size, "11 unpruned"), images.labels)
    rows = []
    for b in chosen:
        members = b["channel_list"]
        pruned = class_stats(predict(bundle, images, {b["layer"]: members}, batch_size,
                                     f"11 prune {b['basket']}"), images.labels)
        # Controls avoid the basket's own neurons when the layer has enough others to draw
        # from; in a small layer they are drawn from all of its neurons so they keep its size.
        spare = channels[b["layer"]] - len(members) >= len(members)
        controls = random_baskets(channels[b["layer"]], len(members), n_controls,
                                  seed=seed + b["number"] + 1000 * len(rows),
                                  exclude=members if spare else [])
        ctrl = [class_stats(predict(bundle, images, {b["layer"]: c}, batch_size, "11 control"),
                            images.labels) for c in controls]
        for label, base in before.items():
            acc_r = [c[label]["accuracy"] for c in ctrl]
            p_r = [c[label]["p_true"] for c in ctrl]
            rows.append({
                "basket": b["basket"], "layer": b["layer"], "size": len(members),
                "class_idx": label, "class_name": class_name(bundle, images, label),
                "n_images": base["n"], "accuracy_before": round(base["accuracy"], 4),
                "accuracy_pruned": round(pruned[label]["accuracy"], 4),
                "accuracy_random": round(float(np.mean(acc_r)), 4) if acc_r else "",
                "accuracy_random_sd": round(float(np.std(acc_r)), 4) if acc_r else "",
                "delta_pruned": round(pruned[label]["accuracy"] - base["accuracy"], 4),
                "delta_random": round(float(np.mean(acc_r)) - base["accuracy"], 4) if acc_r else "",
                "p_true_before": round(base["p_true"], 4),
                "p_true_pruned": round(pruned[label]["p_true"], 4),
                "p_true_random": round(float(np.mean(p_r)), 4) if p_r else "",
                "controls": " ".join(",".join(map(str, c)) for c in controls)})
    return rows


# ---------------------------------------------------------------------------------------------
# Build


def plot_tree(tree: np.ndarray, min_corr: float, layer: str, path: Path) -> None:
    """Dendrogram of one layer, heights as correlation, with the cut drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import dendrogram
    fig, ax = plt.subplots(figsize=(10, 4))
    dendrogram(tree, ax=ax, color_threshold=1 - min_corr, no_labels=len(tree) > 60,
               above_threshold_color="#999999")
    ax.axhline(1 - min_corr, color="red", lw=1, ls="--")
    ax.set_ylabel("1 − mean correlation")
    ax.set_title(f"{layer}: baskets below the red line (mean correlation ≥ {min_corr})")
    fig.tight_layout()
    from io import BytesIO
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def build(run: Run, settings: Settings = Settings(), describe=None, bundle=None,
          args: dict | None = None) -> dict:
    """Find, describe and prune the baskets of every layer of ``run``.

    ``describe`` (like ``common.describers.describe_index``) and ``bundle`` (the model) replace the
    ones this function would use — tests pass small ones. Returns {"baskets", "pruning"} rows.
    """
    from common.artefacts import read_activations, read_images, read_stats
    from common.baskets import cluster, correlation, joint_images, random_baskets
    describer = parse_describe_args(settings.describe_args)  # refused before any work
    min_corr, grid, tile, seed = settings.min_corr, settings.grid, settings.tile, settings.seed
    run_dir = run.folder
    retract_meta(run.meta(STAGE))  # not done until the new meta is written
    sweep_temporaries(run.basket_dir)
    metas = [read_meta(run.activations), read_meta(run.stats)]
    if run.descriptions.is_file():
        metas.append(read_meta(run.descriptions))
    merge_lineage(metas)  # refuse 03 sentences of another run's mosaics
    layers, _, tops = read_activations(run.activations)
    paths = [r.path for r in read_images(run.images)]
    levels = layer_levels(run.descriptions)
    folder = run.basket_dir
    folder.mkdir(parents=True, exist_ok=True)
    baskets, trees, index_rows, cache = [], {}, [], {}
    for layer in layers:
        stats = read_stats(run.stats, layer, "max")
        corr = correlation(stats)
        tree, found = cluster(corr, min_corr)
        trees[f"{layer}/linkage"] = tree
        trees[f"{layer}/correlation"] = corr.astype(np.float32)
        if len(tree):
            plot_tree(tree, min_corr, layer, folder / f"tree_{layer_slug(layer)}.png")
        log.info("%s: %d baskets of ≥ 2 neurons (%d of %d neurons in one)", layer, len(found),
                 sum(len(b.members) for b in found), corr.shape[0])
        for b in found:
            # The seed's random-index baseline: the same measure on random sets of the same size.
            chance = [corr[np.ix_(r, r)][~np.eye(len(r), dtype=bool)].mean()
                      for r in random_baskets(corr.shape[0], len(b.members), 20, seed + b.number)]
            ids, _, hits = joint_images(np.asarray(stats[:, b.members]), grid * grid)
            png, placed = image_mosaic(ids, paths, grid, tile, cache)
            mosaic = layer_dir(folder, layer) / f"b{b.number}.png"
            write_bytes(mosaic, png)
            name = f"{layer}:b{b.number}"
            index_rows.append({"layer": f"{layer}:basket", "channel": b.number,
                               "path": os.path.relpath(mosaic, folder), "n_tiles": placed,
                               "grid": grid, "tile_px": tile, "crop": "image"})
            baskets.append({"basket": name, "layer": layer, "number": b.number,
                            "size": len(b.members), "channel_list": b.members,
                            "members": " ".join(map(str, b.members)),
                            "cohesion": round(b.cohesion, 4),
                            "random_cohesion": round(float(np.mean(chance)), 4),
                            "join_corr": round(b.join_corr, 4) if np.isfinite(b.join_corr) else "",
                            "node": b.node, "parent": b.parent, "depth": b.depth,
                            "sibling_members": " ".join(map(str, b.sibling_members)),
                            "joint_hits": hits, "top_images": " ".join(map(str, ids[:10])),
                            "mosaic": os.path.relpath(mosaic, run_dir)})
    sentences = {}
    if index_rows:
        sentences = describe_mosaics(index_rows, folder, describer,
                                     {f"{layer}:basket": levels.get(layer, 1) for layer in layers},
                                     metas, describe)
    for b in baskets:
        b["description"] = sentences.get((f"{b['layer']}:basket", b["number"]), "")
    channels = {layer: tops[layer].channels for layer in layers}
    pruning = prune_baskets(baskets, channels, run, settings, bundle) if settings.prune > 0 else []
    save_npz(run.tree, trees)
    write_csv(run.baskets, baskets, BASKET_FIELDS)
    write_csv(run.pruning, pruning, PRUNE_FIELDS)
    write_meta(run.meta(STAGE), STAGE, dict(args or {}),
               outputs=[run.baskets, run.tree, run.pruning], inputs=metas,
               min_corr=min_corr, n_baskets=len(baskets))
    return {"baskets": baskets, "pruning": pruning}


# ---------------------------------------------------------------------------------------------
# Union and difference


def baskets_by_name(path: Path) -> dict[str, dict]:
    """11_baskets.csv (read by common.artefacts) by basket name: members as (layer, channel)
    pairs and the basket's sentence."""
    from common.artefacts import read_baskets
    if not path.is_file():
        raise StageError(f"{path} not found: build the baskets first (make baskets)")
    return {row.basket: {"member_set": {(row.layer, c) for c in row.members},
                         "description": row.description} for row in read_baskets(path)}


def tree_node(tree_path: Path, name: str, baskets_path: Path) -> dict:
    """A node of a layer's tree named ``<layer>:n<node>`` (the numbering of 11_baskets.csv's
    ``node`` and ``parent``) as a basket-like dict: its leaves are its members, no sentence.

    Baskets of one cut never share neurons, so set operations become informative between nested
    nodes: a parent minus one of its baskets leaves what the sibling adds.
    """
    from scipy.cluster.hierarchy import to_tree
    layer, _, node = name.rpartition(":")
    trees = load_npz(tree_path)
    if not node.startswith("n") or not node[1:].isdigit() or f"{layer}/linkage" not in trees:
        raise StageError(f"no basket {name!r} in {baskets_path}, and it names no tree node "
                         f"(<layer>:n<node>, the node and parent columns there)")
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
    lines += [f"  set: {result['description']}",
              f"  members: {' '.join(result['members'])}",
              f"  images firing jointly: {result['joint_hits']}; best: "
              f"{', '.join(result['image_paths'])}",
              f"  mosaic: {result['mosaic']}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags: ``--run``, the set operations and the fields of ``Settings``."""
    p = stage_parser(__doc__.split("\n\n")[0])
    add_run(p, "01's files and 03_descriptions.csv",
            "11_baskets.csv, 11_tree.npz, 11_pruning.csv, 11_baskets/ (11_sets/ for a set)")
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
    log.info("%d baskets; pruning rows: %d", len(result["baskets"]), len(result["pruning"]))


if __name__ == "__main__":
    main()
