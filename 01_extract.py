"""Stage 01 — run the CNN over the images and record what activates each neuron.

Reads an image folder (class sub-folders = labels) or a CSV list of images, and a model.
Writes to the run folder (see ARTEFACTS.md):
  01_images.csv        every listed file with status ok/skipped and the reason
  01_predictions.csv   the model's top-5 classes per usable image, with its label
  01_activations.npz   per layer and channel: the top-k images by spatial maximum, with (y, x),
                       receptive-field parameters and, for small feature maps, the activation maps
  01_stats/            per image and channel: spatial max and mean (memory-mappable .npy); for a
                       transformer layer with a class token also that token's value (.cls.npy)
  01_extract.meta.json provenance, and what later stages reuse: the preprocessing (input size,
                       mean, std, channels), the class names, each layer's layout (grid,
                       channels_last, tokens or vector: common/hooks.py), and the accuracy on
                       labelled images (with a warning when it suggests a wrong size or
                       normalisation)

A neuron is a channel of a feature map (B, C, H, W), of a channels-last map (B, H, W, C) or of
transformer tokens (B, N, C); its per-image values are the max and mean over the grid's cells or
the patch tokens, its position the argmax cell or patch.

Example:
  python 01_extract.py --images data/demo_images/images.csv --run data/demo
  python 01_extract.py --images shapes/ --model shapes_net.py:build --weights shapes.pt \
      --classes shapes_classes.txt --input-size 28 --mean 0.5 --std 0.5 --run data/shapes
  python 01_extract.py --images imagenet/val --model resnet50 --weights r50.pth --run data/r50 \
      --shard 0/4          # then: python 01_extract.py --run data/r50 --merge 4 (same other flags)
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

# common.cli before torch: importing it sets the OMP_WAIT_POLICY default, which OpenMP reads
# only when torch loads it (see common/cli.py).
from common.cli import (StageError, add_run, add_settings, comma_list, escaped,
                        exit_on_stage_error, parse_floats, parse_shard, setting, settings_from, shard_slice,
                        stage_parser, start_stage)
from common.artefacts import ImageRow, Prediction, Run, columns
import numpy as np
import torch
from tqdm import tqdm

from common.activations import StreamingTopK
from common.io import (CsvLines, DiskFull, NpyRowWriter, atomic_path, disk_guard, load_npz,
                       read_json, replace_dir, save_npz, sweep_temporaries, temp_dir, write_json)
from common.provenance import retract_meta, write_meta

log = logging.getLogger("neuron-atlas.01_extract")

STAGE = "01_extract"
IMAGE_FIELDS = columns(ImageRow)  # the readers' own columns, in file order
MIN_JUDGED = 10     # labelled images needed before accuracy is judged
PROBE_BELOW = 0.5   # below chance + this share of the way to 100 %, try other preprocessings
NEAR_CHANCE = 0.1   # warn below chance + this share of the way to 100 %
PROBE_IMAGES = 32   # labelled images on which other preprocessings are tried …
PROBE_SCREEN = 8    # … each first on this many, going on only if it gets 2 more right there
PRED_FIELDS = columns(Prediction)


@dataclass(frozen=True)
class Settings:
    """Stage 01's settings: one flag each (``--topk`` …), defaults written here only."""

    model: str = setting("efficientnet_lite0", "efficientnet_lite0, a torchvision name, "
                         "file.py:function or checkpoint.pt", make="MODEL")
    weights: str | None = setting(None, "state-dict file for the model", make="WEIGHTS")
    random_init: bool = setting(False, "allow random weights (no training)", make="RANDOM_INIT")
    unsafe_pickle: bool = setting(False, "load a whole pickled checkpoint with "
                                  "weights_only=False (trusted files only)", make="UNSAFE_PICKLE")
    layers: str = setting("", "comma-separated dotted layer names (empty: the model's default "
                          "layers; python -m tools.layers MODEL lists the readable ones)",
                          make="LAYERS")
    topk: int = setting(100, "top images kept per neuron", make="TOPK")
    batch_size: int = setting(32, "images per forward pass", make="BATCH")
    workers: int = setting(2, "threads decoding images", make="WORKERS")
    input_size: int | None = setting(None, "side of the square network input (default: the "
                                     "model's own, e.g. 224)", make="INPUT_SIZE")
    mean: str | None = setting(None, "normalisation mean, 1 or 3 comma-separated values "
                               "(default: the model's)", make="MEAN")
    std: str | None = setting(None, "normalisation std, 1 or 3 comma-separated values "
                              "(default: the model's)", make="STD")
    classes: str | None = setting(None, "class names in output order: a text file (one per "
                                  "line) or a CSV index,name (default: the model's own, "
                                  "ImageNet's, or the class folders)", make="CLASSES")
    max_map_side: int = setting(16, "keep the activation maps of top images for layers whose "
                                "feature map is at most this wide (used by 02 --crop mask)")
    device: str = setting("auto", "auto (cuda if present), cpu, cuda, cuda:1 …", make="DEVICE")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of stage 01: its images, ``--run``, sharding and ``Settings``."""
    p = stage_parser(__doc__.split("\n")[0])
    p.add_argument("--images", help="image folder (class sub-folders = labels) or CSV (path,label)")
    add_run(p, "the images and the model", "01_images.csv, 01_predictions.csv, "
            "01_activations.npz and 01_stats/")
    p.add_argument("--shard", type=parse_shard, default=None,
                   help="i/N: process only the i-th of N slices of the images into 01_parts/")
    p.add_argument("--merge", type=int, default=None, metavar="N",
                   help="combine the N shard results in 01_parts/ into the final outputs")
    add_settings(p, Settings)
    return p


def load_one(path: str, size: int, mean, std, skip_reason: str = ""):
    """Decode one image into a network-input tensor → (tensor or None, note or reason); an image
    with a ``skip_reason`` (a duplicate) is not decoded."""
    from common.images import BadImage, load_rgb, network_input, to_tensor
    if skip_reason:
        return None, skip_reason
    try:
        img, note = load_rgb(path)
    except BadImage as err:
        return None, err.reason
    return to_tensor(network_input(img, size), mean, std), note


def label_indices(labels: list[str], class_names: list[str] | None) -> tuple[dict[str, int], list[str]]:
    """Map dataset labels onto the model's class indices; unmapped labels are returned, not guessed."""
    present = sorted({lab for lab in labels if lab})
    if class_names is None:
        mapping = {lab: int(lab) for lab in present if lab.isdigit()}
        return mapping, [lab for lab in present if lab not in mapping]
    from common.images import map_labels
    synsets = None
    if len(class_names) == 1000:
        from common.imagenet import synsets as imagenet_synsets
        synsets = imagenet_synsets()
    return map_labels(present, class_names, synsets)


def make_reducer(max_map_side: int, layout):
    """Hook reduction of one layer output of ``layout`` (common.hooks.Layout): per image and
    channel the max over its cells (patch tokens), its (y, x), the mean, the class token's value
    if there is one, and for small maps the map itself — computed at once, before any in-place
    change."""
    def reduce(out: torch.Tensor):
        grid = layout.to_grid(out.detach())
        b, c, h, w = grid.shape
        flat = grid.float().reshape(b, c, h * w)
        mx, idx = flat.max(dim=2)
        keep_map = max(h, w) <= max_map_side
        cls = layout.class_token(out.detach())
        return {"max": mx.cpu(), "mean": flat.mean(dim=2).cpu(),
                "y": (idx // w).int().cpu(), "x": (idx % w).int().cpu(),
                "map": flat.reshape(b, c, h, w).half().cpu() if keep_map else None,
                "cls": None if cls is None else cls.float().cpu(),
                "shape": (c, h, w)}
    return reduce


def stat_kinds(layout) -> tuple[str, ...]:
    """The 01_stats files of a layer: max and mean, and the class token's value if it has one."""
    return ("max", "mean", "cls") if layout.has_class_token else ("max", "mean")


def iter_batches(entries, batch_ids, batch_size, size, mean, std, workers, prefetch=2,
                 skip: dict[int, str] | None = None):
    """Yield (batch index, ids, [(tensor|None, note)]) in order, decoding ``prefetch`` batches ahead
    in a thread pool so that memory stays bounded whatever the number of images; the images in
    ``skip`` (id → reason) are not decoded."""
    skip = skip or {}

    def submit(pool, b):
        ids = range(b * batch_size, min((b + 1) * batch_size, len(entries)))
        return b, list(ids), [pool.submit(load_one, entries[i].path, size, mean, std,
                                          skip.get(i, "")) for i in ids]

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        queue: collections.deque[tuple[int, list[int], list[Future]]] = collections.deque()
        pending = iter(batch_ids)
        for b in pending:
            queue.append(submit(pool, b))
            if len(queue) > prefetch:
                break
        while queue:
            b, ids, futures = queue.popleft()
            nxt = next(pending, None)
            if nxt is not None:
                queue.append(submit(pool, nxt))
            yield b, ids, [f.result() for f in futures]


def extract_part(bundle, entries, label_map, layers, topk, batch_size, workers, max_map_side,
                 batch_ids, part_dir: Path, layouts: dict,
                 skip: dict[int, str] | None = None) -> dict:
    """Run the model over the given batches; write stats, image rows and predictions of this part
    into ``part_dir`` and return its top-k arrays with the layers' shapes (which a shard also
    saves, as topk.npz). ``layouts``: each layer's ``common.hooks.Layout``."""
    from common.hooks import reduce_outputs
    n_rows = sum(len(range(b * batch_size, min((b + 1) * batch_size, len(entries))))
                 for b in batch_ids)
    size, device = bundle.input_size, bundle.device
    tops: dict[str, StreamingTopK] = {}
    shapes: dict[str, tuple] = {}
    writers: dict[str, dict[str, NpyRowWriter]] = {}
    stats_dir = part_dir / "stats"
    stats_dir.mkdir(parents=True, exist_ok=True)
    progress = tqdm(total=n_rows, desc="01 extract", unit="img", disable=None)
    rows_done = 0
    # Rows go straight to disk so that memory does not grow with the number of images.
    with CsvAppender(part_dir / "images.csv", IMAGE_FIELDS) as image_rows, \
            CsvAppender(part_dir / "predictions.csv", PRED_FIELDS) as pred_rows, \
            reduce_outputs(bundle.model, layers,
                           {name: make_reducer(max_map_side, layouts[name]) for name in layers}
                           ) as outputs, \
            torch.inference_mode():
        for _b, ids, loaded in iter_batches(entries, batch_ids, batch_size, size, bundle.mean,
                                            bundle.std, workers, skip=skip):
            good = [j for j, (tensor, _) in enumerate(loaded) if tensor is not None]
            for image_id, (tensor, note) in zip(ids, loaded):
                entry = entries[image_id]
                image_rows.write({"image_id": image_id, "path": entry.path, "label": entry.label,
                                   "label_idx": label_map.get(entry.label, -1),
                                   "status": "ok" if tensor is not None else "skipped",
                                   "reason": escaped(note)})
            logits = None
            if good:
                batch = torch.stack([loaded[j][0] for j in good]).to(device)
                logits = bundle.model(batch)
            for name in layers:
                if not good and name not in shapes:
                    continue  # shapes are learnt from the first batch with a usable image
                if good:
                    res = outputs[name]
                    shapes[name] = res["shape"]
                    if name not in tops:
                        c, h, w = res["shape"]
                        tops[name] = StreamingTopK(c, topk, (h, w) if max(h, w) <= max_map_side else None)
                        writers[name] = {kind: NpyRowWriter(stats_dir / f"{name}.{kind}.npy",
                                                            n_rows, c)
                                         for kind in stat_kinds(layouts[name])}
                        for w_ in writers[name].values():
                            w_.write(np.full((rows_done, c), np.nan, np.float32))
                        check_space(part_dir, writers)
                    good_ids = np.asarray([ids[j] for j in good], dtype=np.int64)
                    tops[name].update(res["max"].numpy(), good_ids, res["y"].numpy(),
                                      res["x"].numpy(),
                                      None if res["map"] is None else res["map"].numpy())
                c = shapes[name][0]
                for kind, writer in writers[name].items():
                    block = np.full((len(ids), c), np.nan, np.float32)
                    if good:
                        block[good] = res[kind].numpy()
                    writer.write(block)
            if logits is not None:
                pred_rows.write_all(prediction_rows(logits, [ids[j] for j in good], entries, label_map,
                                                 bundle.class_names))
            rows_done += len(ids)
            progress.update(len(ids))
    progress.close()
    for name in layers:
        if name not in writers:
            continue
        for w_ in writers[name].values():
            w_.close()
    arrays = {}
    for name, top in tops.items():
        arrays.update(top.arrays(name))
        arrays[f"{name}/fmap"] = np.asarray(shapes[name], dtype=np.int64)
    return arrays


def prediction_rows(logits: torch.Tensor, ids, entries, label_map, class_names) -> list[dict]:
    """Top-5 predictions of a batch as CSV rows (nothing when the output is not a class vector)."""
    if logits.ndim != 2:
        return []
    probs = torch.softmax(logits.float(), dim=1).cpu()
    top_p, top_i = probs.topk(min(5, probs.shape[1]), dim=1)
    rows = []
    for image_id, p_row, i_row in zip(ids, top_p.tolist(), top_i.tolist()):
        entry = entries[image_id]
        label_idx = label_map.get(entry.label, -1)
        pred = i_row[0]
        rows.append({
            "image_id": image_id, "path": entry.path, "label": entry.label, "label_idx": label_idx,
            "pred_idx": pred, "pred_name": class_names[pred] if class_names else str(pred),
            "prob": f"{p_row[0]:.6f}", "correct": "" if label_idx < 0 else int(pred == label_idx),
            "top5_idx": " ".join(str(i) for i in i_row),
            "top5_prob": " ".join(f"{p:.6f}" for p in p_row)})
    return rows


def check_space(folder: Path, writers: dict) -> None:
    """Stop before the statistics fill the disk: they are the bulk of 01's output (its final
    files are renamed from ``folder``, so they need no second copy)."""
    needed = sum(4 * w.n_cols * (w.n_rows - w.written) for kinds in writers.values()
                 for w in kinds.values())
    if shutil.disk_usage(folder).free < needed:
        raise DiskFull(folder, needed)


class CsvAppender:
    """A CSV file written row by row (inside a temporary part folder, so no atomic rename), in
    the format of ``common.io.write_csv``."""

    def __init__(self, path: Path, fields: list[str]):
        """Remember where to write and the column names."""
        self.path, self.fields = path, fields

    def __enter__(self):
        """Open the file and write the header."""
        self.fh = open(self.path, "w", newline="", encoding="utf-8")
        self.lines = CsvLines(self.fields)
        self.fh.write(self.lines.header())
        return self

    def write(self, row: dict) -> None:
        """Append one row."""
        self.write_all([row])

    def write_all(self, rows) -> None:
        """Append several rows."""
        with disk_guard(self.path.parent, partial=self.path):
            self.fh.write("".join(self.lines.line(row) for row in rows))

    def __exit__(self, exc_type, *exc):
        """Close the file (flushing it may find the disk full too)."""
        if exc_type is not None:
            with contextlib.suppress(OSError):
                self.fh.close()
            return
        with disk_guard(self.path.parent, partial=self.path):
            self.fh.close()


def count_rows(path: Path) -> int:
    """Number of data rows of a CSV, read as a stream."""
    with open(path, newline="", encoding="utf-8") as fh:
        return sum(1 for _ in csv.DictReader(fh))


def concat_csv(sources: list[Path], dest: Path) -> int:
    """Stream CSVs with one header into ``dest`` atomically, byte for byte; return the number of
    data rows — records, not lines: a file name may hold a newline (quoted in the CSV)."""
    def copied(lines, out):
        """Yield ``lines`` after writing each to ``out``."""
        for line in lines:
            out.write(line)
            yield line

    n_rows = 0
    with atomic_path(dest) as tmp, open(tmp, "w", encoding="utf-8", newline="") as out:
        for i, source in enumerate(sources):
            with open(source, encoding="utf-8", newline="") as fh:
                header = fh.readline()
                if i == 0:
                    out.write(header)
                n_rows += sum(1 for _ in csv.reader(copied(fh, out)))
    return n_rows


def concat_stats(sources: list[Path], rows: list[int], dest: Path, n_images: int,
                 channels: int) -> None:
    """Stack the shards' per-image statistics into one .npy, in bounded memory; a shard whose
    images were all unusable has no file and contributes NaN rows."""
    writer = NpyRowWriter(dest, n_images, channels)
    for source, n_rows in zip(sources, rows):
        if source.exists():
            block = np.load(source, mmap_mode="r")
            for start in range(0, block.shape[0], 4096):
                writer.write(block[start:start + 4096])
        else:
            writer.write(np.full((n_rows, channels), np.nan, np.float32))
    writer.close()


def assemble(parts: list[Path], part_arrays: list[dict], run: Run, layers: list[str], rfs: dict,
             input_size: int, n_images: int, layouts: dict) -> dict:
    """Combine part folders (one for a plain run, N for shards) and their top-k arrays into the
    final artefacts."""
    n_rows = concat_csv([part / "images.csv" for part in parts], run.images)
    if n_rows != n_images:
        raise StageError(f"the parts cover {n_rows} of {n_images} images; run every shard "
                         f"with the same flags before --merge")
    arrays = {"layers": np.asarray(layers), "input_size": np.asarray([input_size, input_size])}
    with open(run.images, newline="", encoding="utf-8") as fh:
        n_ok = sum(row["status"] == "ok" for row in csv.DictReader(fh))  # streamed, not loaded
    if n_ok == 0:
        raise StageError(f"none of the {n_images} images could be used (reasons in "
                         f"{run.images}); check IMAGES=…")
    concat_csv([part / "predictions.csv" for part in parts], run.predictions)

    for name in layers:
        present = [a for a in part_arrays if f"{name}/values" in a]
        if len(present) == 1:  # already ranked (StreamingTopK.arrays): no copy of the maps
            arrays.update({key: value for key, value in present[0].items()
                           if key.startswith(f"{name}/")})
        else:
            top = StreamingTopK.from_arrays(present[0], name)
            for other in present[1:]:
                top.merge(StreamingTopK.from_arrays(other, name))
            arrays.update(top.arrays(name))
        arrays[f"{name}/fmap"] = present[0][f"{name}/fmap"]
        arrays[f"{name}/rf"] = rfs[name].as_array()

    if len(parts) == 1 and all((parts[0] / "stats" / f"{name}.{kind}.npy").exists()
                               for name in layers for kind in stat_kinds(layouts[name])):
        stats_tmp = parts[0] / "stats"  # a single run's files are already complete: move, not copy
    else:
        stats_tmp = temp_dir(run.folder, "01_stats")
        part_rows = [count_rows(part / "images.csv") for part in parts]
        for name in layers:
            channels = int(arrays[f"{name}/fmap"][0])
            for kind in stat_kinds(layouts[name]):
                concat_stats([part / "stats" / f"{name}.{kind}.npy" for part in parts],
                             part_rows,
                             stats_tmp / f"{name}.{kind}.npy", n_images, channels)
    replace_dir(stats_tmp, run.stats)
    save_npz(run.activations, arrays)
    return {"n_images": n_images, "n_ok": n_ok, "n_skipped": n_images - n_ok}


def run(run: Run, images: str, bundle, layers: list[str], settings: Settings = Settings(),
        shard: tuple[int, int] | None = None, merge: int | None = None,
        args: dict | None = None) -> dict | None:
    """Extract activations of ``layers`` of ``bundle`` (the model of ``settings``, loaded by
    ``main``) over ``images`` into ``run``.

    With ``shard`` only a slice is processed into ``<run>/01_parts/``; with ``merge`` the parts
    are combined. Returns a summary (None for a shard).
    """
    out = run.folder
    topk, batch_size = settings.topk, settings.batch_size
    workers, max_map_side = settings.workers, settings.max_map_side
    from common.hooks import CHANNELS_LAST, TOKENS, read_layouts
    from common.images import find_duplicates, list_images
    from common.rf import receptive_fields
    out.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out)  # what a killed earlier run left half-written
    entries = list_images(images)
    if not entries:
        raise StageError(f"no image files found in {images}")
    skip = find_duplicates(entries)
    name_classes(bundle, [e.label for e in entries], Path(images).is_dir())
    label_map, unmapped = label_indices([e.label for e in entries], bundle.class_names)
    if unmapped:
        valid = ", ".join(bundle.class_names[:20]) + (" …" if len(bundle.class_names or []) > 20
                                                       else "") if bundle.class_names else \
            f"indices 0–{(bundle.n_outputs or 1) - 1}"
        log.warning("labels %s map to no class of the model: their images get label_idx -1. "
                    "The model's classes: %s (name them with CLASSES=names.txt)",
                    ", ".join(repr(lab) for lab in unmapped[:10]), valid)
    layouts = read_layouts(bundle.model, layers, (bundle.input_size, bundle.input_size),
                           bundle.channels, bundle.n_outputs, getattr(bundle, "shapes", None))
    n_batches = -(-len(entries) // batch_size)
    parts_root = out / "01_parts"

    if shard is not None:
        part_dir = parts_root / f"{shard[0]}of{shard[1]}"
        parts_root.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(parts_root, part_dir.name)
        try:
            save_npz(tmp / "topk.npz", extract_part(
                bundle, entries, label_map, layers, topk, batch_size, workers, max_map_side,
                list(shard_slice(n_batches, shard)), tmp, layouts, skip))
            write_json(tmp / "part.json", {"shard": list(shard), "n_images": len(entries),
                                           "batch_size": batch_size, "layers": layers,
                                           "topk": topk, "inputs": inputs_digest(bundle, entries)})
            replace_dir(tmp, part_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("shard %d/%d written to %s", shard[0], shard[1], part_dir)
        return None

    if merge is not None:
        parts = [parts_root / f"{i}of{merge}" for i in range(merge)]
        missing = [str(p) for p in parts if not (p / "part.json").exists()]
        if missing:
            raise StageError(f"cannot merge: shard results missing: {', '.join(missing)}")
        for part in parts:
            info = load_part_info(part)
            if (info["n_images"], info["batch_size"], info["layers"], info["topk"],
                    info.get("inputs")) != (len(entries), batch_size, layers, topk,
                                            inputs_digest(bundle, entries)):
                raise StageError(f"{part} was made with other settings, model or images "
                                 f"({info}); re-run that shard")
        tmpdirs = None
    else:
        tmpdirs = temp_dir(out, "01_part")
        parts = [tmpdirs]
    try:
        if tmpdirs is None:
            part_arrays = [load_npz(part / "topk.npz") for part in parts]
        else:  # one part, kept in memory
            part_arrays = [extract_part(bundle, entries, label_map, layers, topk, batch_size,
                                        workers, max_map_side, list(range(n_batches)), tmpdirs,
                                        layouts, skip)]
        # Transformer layers get their patch as a field (attention sees the whole image).
        rfs = receptive_fields(bundle.model, layers, (bundle.input_size, bundle.input_size),
                               patch_grids={name: layout.grid for name, layout in layouts.items()
                                            if layout.kind in (TOKENS, CHANNELS_LAST)})
        retract_meta(run.meta(STAGE))
        summary = assemble(parts, part_arrays, run, layers, rfs, bundle.input_size,
                           len(entries), layouts)
    finally:
        if tmpdirs is not None:
            shutil.rmtree(tmpdirs, ignore_errors=True)
    accuracy = check_accuracy(run.predictions, bundle)
    write_meta(run.meta(STAGE), STAGE, args or {},
               outputs=[run.activations, run.images, run.predictions,
                        *sorted(run.stats.glob("*.npy"))],
               model=bundle.spec, layers=layers, **summary, preprocess=bundle.preprocess,
               classes=bundle.class_names, class_source=bundle.class_source,
               n_duplicates=len(skip), accuracy=accuracy,
               rf={name: rfs[name].as_array().tolist() for name in layers},
               layouts={name: layouts[name].as_dict() for name in layers})
    if merge is not None:
        shutil.rmtree(parts_root)
    log.info("%d images (%d skipped) → %s", summary["n_images"], summary["n_skipped"], out)
    return summary


def name_classes(bundle, labels: list[str], from_folder: bool) -> None:
    """Give a model without class names the sorted class folder names when they are as many as
    its outputs (torchvision's ImageFolder convention), and say in the log what was done."""
    from common.classes import folder_classes
    if bundle.class_names is not None or bundle.n_outputs is None:
        return
    names = folder_classes(labels, bundle.n_outputs) if from_folder else None
    if names:
        bundle.class_names, bundle.class_source = names, "the sorted class folder names"
        log.info("class names: the %d class folders, sorted (torchvision's ImageFolder "
                 "convention: output 0 = %s, output %d = %s); give CLASSES=names.txt if the model "
                 "was trained with another order", len(names), names[0], len(names) - 1, names[-1])
    else:
        log.info("the model's %d outputs have no names: reports show indices. Name them with "
                 "CLASSES=names.txt (one name per line, in output order) or a CSV of index,name",
                 bundle.n_outputs)


def check_accuracy(predictions: Path, bundle) -> dict | None:
    """The model's accuracy on the labelled images; a loud warning (also returned, for the
    metadata) when it is near chance or far below what another input size or normalisation gets
    on a sample — the usual sign of inputs prepared unlike in training. A model with random
    weights, asked for, is not judged."""
    with open(predictions, newline="", encoding="utf-8") as fh:
        labelled = [(int(r["label_idx"]), int(r["pred_idx"]), r["path"])
                    for r in csv.DictReader(fh) if int(r["label_idx"]) >= 0]
    if not labelled:
        return None
    counts = collections.Counter(label for label, _, _ in labelled)
    correct = sum(label == pred for label, pred, _ in labelled)
    accuracy = correct / len(labelled)
    # Guessing gets the larger of one-in-N outputs and always naming the most frequent class.
    chance = max(1 / (bundle.n_outputs or len(counts)), max(counts.values()) / len(labelled))
    result = {"n_labelled": len(labelled), "n_correct": correct, "accuracy": round(accuracy, 4),
              "chance": round(chance, 4), "better": None, "warning": ""}
    log.info("accuracy on the %d labelled images: %.1f%% (chance: %.1f%%)", len(labelled),
             100 * accuracy, 100 * chance)
    if bundle.spec.get("random_init"):
        # Untrained on request (load_model has said so loudly): accuracy near chance is what
        # random weights give, and no other preprocessing can fix it, so nothing is probed.
        log.info("random weights: accuracy is not judged and no other preprocessing is tried")
        return result
    if len(labelled) < MIN_JUDGED or accuracy >= chance + PROBE_BELOW * (1 - chance):
        return result
    now = (f"INPUT_SIZE (now {bundle.input_size}), MEAN (now "
           f"{','.join(f'{v:g}' for v in bundle.mean)}) and STD (now "
           f"{','.join(f'{v:g}' for v in bundle.std)})")
    best = probe_preprocessing(bundle, labelled)
    if best and best["accuracy"] >= max(1.5 * best["current"], best["current"] + 0.15):
        result["better"] = best
        result["warning"] = (
            f"the model is right on {100 * accuracy:.1f}% of the {len(labelled)} labelled images, "
            f"but on a sample of {best['n']} it gets {100 * best['accuracy']:.0f}% (instead of "
            f"{100 * best['current']:.0f}%) with INPUT_SIZE={best['input_size']} "
            f"MEAN={best['mean']} STD={best['std']}: its inputs are probably prepared unlike in "
            f"training. Check {now}")
    elif accuracy < chance + NEAR_CHANCE * (1 - chance):
        result["warning"] = (
            f"the model is right on only {100 * accuracy:.1f}% of the {len(labelled)} labelled "
            f"images (chance: {100 * chance:.1f}%). Its inputs are probably prepared unlike in "
            f"training: check {now}, and that CLASSES lists the names in output order")
    if result["warning"]:
        result["warning"] += ". Every later stage explains this model on these inputs"
        log.warning("%s\n%s\n%s", "!" * 78, result["warning"], "!" * 78)
    return result


def probe_preprocessing(bundle, labelled: list[tuple[int, int, str]]) -> dict | None:
    """The best accuracy, on an even sample of the labelled images, over other input sizes (the
    images' own median shorter side, 224) and normalisations (0.5/0.5, ImageNet's, none), with the
    current setting's accuracy on the same sample; None when no image of the sample decodes.

    The current setting's answers are 01's own predictions. Every other setting is run on the
    first PROBE_SCREEN images of the sample, and on the rest only when it gets at least two more
    of those right than the current one: a preprocessing mistake costs far more than that, and a
    run whose accuracy is only modest (such as the demo's) is spared most of the forward passes.
    """
    from common.images import BadImage, load_rgb, network_input, to_tensor
    from common.models import IMAGENET_MEAN, IMAGENET_STD
    step = max(1, len(labelled) // PROBE_IMAGES)
    sample = []  # (label, 01's prediction, image)
    for label, pred, path in labelled[::step][:PROBE_IMAGES]:
        try:
            sample.append((label, pred, load_rgb(path)[0]))
        except BadImage:
            continue
    if not sample:
        return None
    c = bundle.channels
    current = (bundle.input_size, tuple(bundle.mean), tuple(bundle.std))
    sizes = sorted({bundle.input_size, 224,
                    int(np.median([min(img.size) for _, _, img in sample]))})
    norms = {(tuple(bundle.mean), tuple(bundle.std)), ((0.5,) * c, (0.5,) * c),
             ((0.0,) * c, (1.0,) * c),
             (IMAGENET_MEAN if c == 3 else (0.449,), IMAGENET_STD if c == 3 else (0.226,))}
    settings = sorted({(size, mean, std) for size in sizes for mean, std in norms} - {current})
    labels = torch.tensor([label for label, _, _ in sample])
    screen = min(PROBE_SCREEN, len(sample))
    hits = [label == pred for label, pred, _ in sample]
    scores = {current: sum(hits) / len(sample)}
    views = {}  # size → the sample's network inputs at that size

    def n_right(size: int, mean, std, lo: int, hi: int) -> int | None:
        """How many of sample images lo … hi − 1 a setting gets right (None: the model refuses
        the size)."""
        if size not in views:
            views[size] = [network_input(img, size) for _, _, img in sample]
        batch = torch.stack([to_tensor(v, mean, std) for v in views[size][lo:hi]])
        try:
            logits = bundle.model(batch.to(bundle.device))
        except RuntimeError:  # a model fixed to one input size
            return None
        return int((logits.argmax(1).cpu() == labels[lo:hi]).sum())
    with torch.inference_mode():
        for size, mean, std in settings:
            first = n_right(size, mean, std, 0, screen)
            if first is not None and first >= sum(hits[:screen]) + 2:
                rest = n_right(size, mean, std, screen, len(sample)) if screen < len(sample) else 0
                scores[size, mean, std] = (first + (rest or 0)) / len(sample)
    now = scores[current]
    (size, mean, std), accuracy = max(scores.items(), key=lambda kv: kv[1])
    return {"n": len(sample), "input_size": size, "mean": ",".join(f"{v:g}" for v in mean),
            "std": ",".join(f"{v:g}" for v in std), "accuracy": round(accuracy, 4),
            "current": round(now, 4)}


def inputs_digest(bundle, entries) -> str:
    """Fingerprint of what a shard's results depend on besides the flags: the model (its
    arguments, files by content, preprocessing, class names) and every listed image (path, label,
    size, mtime), so that shards made from other inputs are never merged."""
    from common.fingerprint import fingerprint, stat_line
    spec = bundle.spec
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([spec, bundle.class_names, bundle.preprocess,
                              fingerprint(None, spec["name"], spec.get("weights"),
                                          spec.get("classes"))]).encode())
    for entry in entries:
        digest.update(f"{entry.path!r} {entry.label!r} {stat_line(entry.path)}\n".encode(
            "utf-8", "surrogateescape"))
    return digest.hexdigest()


def load_part_info(part: Path) -> dict:
    """Settings a shard was made with (to refuse merging incompatible shards)."""
    return read_json(part / "part.json")


@exit_on_stage_error
def main(argv=None):
    """Parse flags, load the model, and run (or shard, or merge) the extraction."""
    parser = build_parser()
    args = start_stage(parser, argv, keep_memory=True)
    if not args.images:
        raise StageError("--images is required (an image folder or a CSV of paths)")
    try:  # "0.5" or "0.485,0.456,0.406" → a tuple, recorded so in the meta
        args.mean, args.std = (parse_floats(v) if v else None for v in (args.mean, args.std))
    except argparse.ArgumentTypeError as err:
        parser.error(f"--mean / --std: {err}")
    settings = settings_from(Settings, args)
    torch.manual_seed(0)
    from common.models import get_module, load_model
    bundle = load_model(settings.model, weights=settings.weights,
                        random_init=settings.random_init, unsafe_pickle=settings.unsafe_pickle,
                        device=settings.device, input_size=settings.input_size,
                        mean=settings.mean, std=settings.std, classes=settings.classes)
    layers = comma_list(settings.layers) or bundle.default_layers
    for name in layers:
        get_module(bundle.model, name)
    run(Run(args.run), args.images, bundle, layers, settings, shard=args.shard,
        merge=args.merge, args=vars(args))


if __name__ == "__main__":
    main()
