"""Stage 02 — tile each neuron's top-activating image crops into one mosaic PNG.

Reads, in the run folder (--run), 01_activations.npz (top images and positions per neuron) and
01_images.csv. Writes one PNG per neuron into 02_mosaics/<layer>/<channel>.png and the index
02_mosaics.csv (layer, channel, path, n_tiles, grid, tile_px, crop). Crops are best-first, row
by row.

Crop modes:
  rf    the receptive field of the maximally activated cell (default). All tiles of a layer share
        one scale; the part of a field past the image border is grey (the network saw padding
        there); a field larger than the image shows the whole image.
  mask  the bounding box of the activation blob around the maximum (upsampled activation map,
        kept above half its peak); pixels outside the blob are dimmed. Meant for deep layers whose
        receptive field covers the whole input; layers without stored maps fall back to rf.

Each source image is decoded once per run into shared memory-mapped caches (the network input for
layers cut at full resolution; whole inputs shrunk once, straight from the photo, for deep layers);
mosaics are then built by a pool of processes.

Example:
  python 02_mosaics.py --run data/demo --grid 10 --tile 64
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.artefacts import Mosaic, Run, columns, layer_dir, read_activations, read_images
from common.cli import (StageError, add_run, add_settings, comma_list, exit_on_stage_error, setting,
                        settings_from, stage_parser, start_stage)
from common.io import disk_guard, sweep_temporaries, temp_dir, write_bytes, write_csv
from common.mosaics import BACKGROUND, paste_tiles, png_bytes
from common.processes import worker_pool
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta
from common.fields import RF, tile_window

log = logging.getLogger("neuron-atlas.02_mosaics")

STAGE = "02_mosaics"
FIELDS = [c for c in columns(Mosaic) if c != "ranks"]  # the reader's columns; ranks: only 09's index
DIM = 0.3         # brightness kept outside the activation blob in mask crops
MASK_LEVEL = 0.5  # blob = upsampled activation above this share of its peak
SPARE_BYTES = 1 << 30  # disk space to leave free beside the scratch image cache, for the PNGs
SHRUNK_FROM = 0.25  # rf windows covering this share of the image or more: cut from a shrunk copy


@dataclass(frozen=True)
class Settings:
    """Stage 02's settings: one flag each (``--grid`` …), defaults written here only."""

    grid: int = setting(10, "tiles per side (grid × grid crops)", make="GRID")
    tile: int = setting(64, "tile side in pixels", make="TILE")
    crop: str = setting("rf", "how crops are cut", make="CROP", choices=("rf", "mask"))
    layers: str = setting("", "comma-separated subset of layers (empty: all)")
    workers: int = setting(os.cpu_count() or 1, "processes (default: one per CPU core)")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of stage 02: ``--run`` and the fields of ``Settings``."""
    p = stage_parser(__doc__.split("\n")[0])
    add_run(p, "01_activations.npz and 01_images.csv", "02_mosaics/ and 02_mosaics.csv")
    add_settings(p, Settings)
    return p


# Worker-process state: the decoded-image cache, opened once per process.
_CACHE: dict = {}


FULL = "images"  # the cache of network inputs; the others are keyed by their (height, width)


def make_cache(cache_dir: Path, slots: dict, size: int) -> None:
    """Create the image caches that ``_decode`` fills, each with ``slots[key]`` images: network
    inputs (key ``FULL``: images.npy) and, per (height, width) key, whole inputs shrunk to that
    size (shrunk_HxW.npy)."""
    for key, n_slots in slots.items():
        name, (height, width) = (key, (size, size)) if key == FULL else (
            "shrunk_{}x{}".format(*key), key)
        np.lib.format.open_memmap(cache_dir / f"{name}.npy", mode="w+", dtype=np.uint8,
                                  shape=(max(1, n_slots), height, width, 3))


def _init_worker(cache_dir: str, size: int) -> None:
    """Open the memory-mapped caches in a worker process: network inputs and their shrunk copies."""
    def open_cache(path: Path) -> np.ndarray:
        """A cache file as a plain array view (slicing a np.memmap is slower)."""
        return np.asarray(np.load(path, mmap_mode="r+"))
    full = Path(cache_dir) / f"{FULL}.npy"
    _CACHE["images"] = open_cache(full) if full.exists() else None
    _CACHE["shrunk"] = {tuple(int(v) for v in path.stem.split("_")[1].split("x")): open_cache(path)
                        for path in Path(cache_dir).glob("shrunk_*.npy")}
    _CACHE["size"] = size


def _decode(task: tuple[str, dict, int]) -> str:
    """Decode one source image into its slots of the caches (``{key: slot}``; grey when the model
    has one input channel) → an error, or "" when it decoded."""
    from common.images import BadImage, load_rgb, network_view, small_views
    path, slots, channels = task
    caches = {key: _CACHE["images"] if key == FULL else _CACHE["shrunk"][key] for key in slots}
    try:
        img, _ = load_rgb(path)
    except BadImage as err:  # changed on disk since 01 read it: its tiles stay grey
        for key, slot in slots.items():
            caches[key][slot] = BACKGROUND
        return err.reason
    if FULL in slots:  # grey for a grey model, as it saw it
        caches[FULL][slots[FULL]] = np.asarray(network_view(img, _CACHE["size"], channels),
                                               dtype=np.uint8)
    shapes = [key for key in slots if key != FULL]
    if shapes:  # straight from the photo: no full-size input made for deep layers' tiles alone
        for key, view in small_views(img, _CACHE["size"], shapes, channels).items():
            caches[key][slots[key]] = np.asarray(view, dtype=np.uint8)
    return ""


def letterbox(crop: np.ndarray, tile: int) -> np.ndarray:
    """Scale a crop to fit a tile × tile square, keeping its aspect ratio, on a grey background."""
    h, w = crop.shape[:2]
    scale = tile / max(h, w)
    new_w, new_h = max(1, _px(w * scale)), max(1, _px(h * scale))
    return _centre(resize_stack(crop[None], new_h, new_w)[0], tile)


def _centre(pixels: np.ndarray, tile: int) -> np.ndarray:
    """``pixels`` (at most tile × tile) in the middle of a grey tile × tile square."""
    h, w = pixels.shape[:2]
    if (h, w) == (tile, tile):
        return pixels
    out = np.full((tile, tile, 3), BACKGROUND, np.uint8)
    top, left = (tile - h) // 2, (tile - w) // 2
    out[top:top + h, left:left + w] = pixels
    return out


def _px(value: float) -> int:
    """Nearest pixel (halves rounded up, unlike Python's round)."""
    return int(math.floor(value + 0.5))


def resize_stack(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize n equal-sized RGB images (n × h × w × 3) to n × height × width × 3, bilinear.

    A bilinear resize is separable: a pass along rows, then one along columns. Stacking the images
    top to bottom for the row pass and side by side for the column pass does n resizes in two
    Pillow calls; the result equals n separate Pillow resizes to within one grey level (Pillow may
    take the passes in the other order, rounding in between differently).
    """
    n, h, w, _ = images.shape
    if (h, w) == (height, width):
        return images
    if w != width:
        rows = Image.fromarray(np.ascontiguousarray(images).reshape(n * h, w, 3))
        images = np.asarray(rows.resize((width, n * h), Image.BILINEAR)).reshape(n, h, width, 3)
    if h != height:
        side_by_side = np.ascontiguousarray(images.transpose(1, 0, 2, 3)).reshape(h, n * width, 3)
        cols = Image.fromarray(side_by_side).resize((n * width, height), Image.BILINEAR)
        images = np.asarray(cols).reshape(height, n, width, 3).transpose(1, 0, 2, 3)
    return images


def _cut(image: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """The height × width window of ``image`` at (top, left); grey where it runs past the image."""
    rows, cols = image.shape[:2]
    if top >= 0 and left >= 0 and top + height <= rows and left + width <= cols:
        return image[top:top + height, left:left + width]
    out = np.full((height, width, 3), BACKGROUND, np.uint8)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, rows), min(left + width, cols)
    if y1 > y0 and x1 > x0:
        out[y0 - top:y1 - top, x0 - left:x1 - left] = image[y0:y1, x0:x1]
    return out


def layer_plan(rf: RF, height: int, width: int, tile: int) -> tuple[int, int, float, tuple | None]:
    """How a layer's rf tiles are made: window height and width, scale into the tile, and the
    (height, width) of the shrunk whole image they are cut from, or None to cut each window at full
    resolution and resize it (small windows, for which shrinking whole images would cost more)."""
    top, left, bottom, right = tile_window(rf, 0, 0, height, width)
    win_h, win_w = max(bottom - top, 1), max(right - left, 1)
    scale = tile / max(win_h, win_w)
    shrunk = None
    if scale < 1 and win_h * win_w >= SHRUNK_FROM * height * width:
        shrunk = (_px(height * scale), _px(width * scale))
    return win_h, win_w, scale, shrunk


def rf_tiles(cells: list[tuple[int, int, int]], rf: RF, tile: int) -> list[np.ndarray | None]:
    """Tiles of receptive-field crops for (slot, y, x) cells; None where the field misses the image.

    Every tile of a layer shows a window of the same size (``tile_window``) at the same scale, so
    patterns can be compared by size across tiles; the part of a field that lies past the image
    border stays grey, as the network saw padding there. Windows that cover much of the image are
    cut from the copy of the whole image shrunk at decoding; smaller ones are cut at full
    resolution and resized together.
    """
    height = width = _CACHE["size"]
    win_h, win_w, scale, shrunk = layer_plan(rf, height, width, tile)
    out_h, out_w = max(1, _px(win_h * scale)), max(1, _px(win_w * scale))
    windows = [tile_window(rf, y, x, height, width) for _, y, x in cells]
    shows = [bottom > 0 and top < height and right > 0 and left < width
             for top, left, bottom, right in windows]
    if shrunk is not None:
        small = _CACHE["shrunk"][shrunk]
        made = [_cut(small[slot], _px(top * scale), _px(left * scale), out_h, out_w) if ok else None
                for (slot, _, _), (top, left, _, _), ok in zip(cells, windows, shows)]
    else:
        cut = [_cut(_CACHE["images"][slot], top, left, win_h, win_w)
               for (slot, _, _), (top, left, _, _), ok in zip(cells, windows, shows) if ok]
        resized = iter(resize_stack(np.stack(cut), out_h, out_w) if cut else [])
        made = [next(resized) if ok else None for ok in shows]
    return [None if pixels is None else _centre(pixels, tile) for pixels in made]


def mask_crop(image: np.ndarray, act_map: np.ndarray) -> np.ndarray:
    """Box around the activation blob that holds the peak, with the rest of the box dimmed."""
    from scipy import ndimage
    size = image.shape[0]
    up = np.asarray(Image.fromarray(act_map.astype(np.float32)).resize((size, size),
                                                                       Image.BILINEAR))
    peak = float(up.max())
    if not np.isfinite(peak) or peak <= 0:
        return image  # nothing positive to outline: show the whole input
    labels, _ = ndimage.label(up >= MASK_LEVEL * peak)
    blob = labels == labels[np.unravel_index(np.argmax(up), up.shape)]
    rows, cols = np.nonzero(blob)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = image[top:bottom, left:right].astype(np.float32)
    keep = blob[top:bottom, left:right, None]
    return np.where(keep, crop, crop * DIM).astype(np.uint8)


def _build(task: dict) -> dict:
    """Build and save one neuron's mosaic from the caches → its index row."""
    images = _CACHE["images"]
    grid, tile = task["grid"], task["tile"]
    ranked = [(rank, cell) for rank, cell in enumerate(task["crops"]) if cell[0] >= 0]
    if task["maps"] is not None:
        tiles = [letterbox(mask_crop(images[slot], task["maps"][rank]), tile)
                 for rank, (slot, _, _) in ranked]
    else:
        tiles = rf_tiles([cell for _, cell in ranked], RF(*task["rf"].tolist()), tile)
    mosaic, n_tiles = paste_tiles(((rank, pixels) for (rank, _), pixels in zip(ranked, tiles)),
                                  grid, tile)
    path = Path(task["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, png_bytes(mosaic))
    return {"layer": task["layer"], "channel": task["channel"], "path": task["rel"],
            "n_tiles": n_tiles, "grid": grid, "tile_px": tile, "crop": task["mode"]}


def pool_map(func, tasks, workers: int, initargs, desc: str):
    """Map ``func`` over ``tasks`` in ``workers`` processes (in-process for 1), in order, with a bar."""
    bar = tqdm(total=len(tasks), desc=desc, unit="it", disable=None)
    if workers <= 1:
        _init_worker(*initargs)
        for task in tasks:
            yield func(task)
            bar.update()
    else:
        with worker_pool(workers, desc, _init_worker, initargs) as pool:
            for result in pool.map(func, tasks, chunksize=8):
                yield result
                bar.update()
    bar.close()


def run(run: Run, settings: Settings = Settings(), args: dict | None = None) -> list[dict]:
    """Build the mosaics of ``run``; return the index rows."""
    activations, images_csv, out_dir, index = run.activations, run.images, run.mosaic_dir, \
        run.mosaics
    grid, tile, crop, workers = settings.grid, settings.tile, settings.crop, settings.workers
    layers = comma_list(settings.layers)
    if grid < 1 or tile < 4:
        raise StageError("--grid must be ≥ 1 and --tile ≥ 4")
    metas = [read_meta(activations), read_meta(images_csv)]
    merge_lineage(metas)  # refuse, before any work, top images of one run and photos of another
    meta_file = run.meta(STAGE)
    sweep_temporaries(out_dir, index.parent)  # what a killed earlier run left behind
    all_layers, input_size, tops = read_activations(activations)
    chosen = layers or all_layers
    unknown = [name for name in chosen if name not in tops]
    if unknown:
        raise StageError(f"layers {unknown} are not in {activations}; it has {all_layers}")
    image_rows = read_images(images_csv)
    n_tiles = grid * grid

    size = input_size[0]
    use_mask = {name: crop == "mask" and tops[name].maps is not None for name in chosen}
    for name in chosen:
        if crop == "mask" and not use_mask[name]:
            log.warning("layer %s has no stored activation maps (feature map larger than 01's "
                        "--max-map-side): using receptive-field crops", name)
    # Each layer's tiles come from one cache: the network inputs, or (deep layers) the whole
    # inputs shrunk to one size at decoding, for all its neurons; slot_of[cache][image id].
    cache_of = {}
    for name in chosen:
        shrunk = layer_plan(RF(*tops[name].rf.tolist()), size, size, tile)[3]
        cache_of[name] = FULL if shrunk is None or use_mask[name] else shrunk
    ids_of: dict = {}
    for name in chosen:
        ids = np.unique(tops[name].image_ids[:, :n_tiles])
        ids_of.setdefault(cache_of[name], set()).update(int(i) for i in ids if i >= 0)
    slot_of = {key: {image_id: slot for slot, image_id in enumerate(sorted(ids))}
               for key, ids in ids_of.items()}
    needed = sorted(set().union(*slot_of.values()))
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = sum(len(ids) * 3 * (size * size if key == FULL else key[0] * key[1])
                  for key, ids in slot_of.items())
    free = shutil.disk_usage(out_dir).free
    if scratch + SPARE_BYTES > free:
        raise StageError(f"02 needs {(scratch + SPARE_BYTES) / 1e9:.1f} GB free in {out_dir} — "
                         f"{scratch / 1e9:.1f} GB of scratch space to hold the {len(needed)} "
                         f"decoded top images while it works and {SPARE_BYTES / 1e9:.1f} GB "
                         f"kept for the mosaics — and {free / 1e9:.1f} GB are free; free some "
                         f"space, or build the mosaics a few layers at a time (--layers)")
    log.info("decoding %d source images into %.2f GB of scratch space in %s", len(needed),
             scratch / 1e9, out_dir)
    cache_dir = temp_dir(out_dir, "cache")
    retract_meta(meta_file)  # mosaics are replaced from here on
    try:
        with disk_guard(out_dir, scratch):  # a full disk or a file-size limit: one line
            make_cache(cache_dir, {key: len(ids) for key, ids in slot_of.items()}, size)
        channels = int((read_meta(activations).get("preprocess") or {}).get("channels", 3))
        decode_tasks = [(image_rows[image_id].path,
                         {key: ids[image_id] for key, ids in slot_of.items() if image_id in ids},
                         channels) for image_id in needed]
        errors = pool_map(_decode, decode_tasks, workers, (str(cache_dir), size), "02 decode")
        for (path, _, _), error in zip(decode_tasks, errors):
            if error:
                log.warning("image %s unreadable now (%s): its tiles stay grey", path, error)

        tasks = []
        for name in chosen:
            top = tops[name]
            for channel in range(top.channels):
                ids = top.image_ids[channel, :n_tiles]
                path = layer_dir(out_dir, name) / f"{channel}.png"
                tasks.append({
                    "layer": name, "channel": channel, "grid": grid, "tile": tile,
                    "mode": "mask" if use_mask[name] else "rf", "rf": top.rf,
                    "crops": [(slot_of[cache_of[name]].get(int(i), -1), int(yy), int(xx))
                              for i, yy, xx in zip(ids, top.y[channel, :n_tiles],
                                                   top.x[channel, :n_tiles])],
                    "maps": top.maps[channel, :n_tiles] if use_mask[name] else None,
                    "path": str(path), "rel": os.path.relpath(path, index.parent)})
        rows = list(pool_map(_build, tasks, workers, (str(cache_dir), size), "02 mosaics"))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    write_csv(index, rows, FIELDS)
    write_meta(meta_file, STAGE, args or {}, outputs=[index],
               inputs=metas, n_mosaics=len(rows), n_source_images=len(needed))
    log.info("%d mosaics from %d source images → %s", len(rows), len(needed), out_dir)
    return rows


@exit_on_stage_error
def main(argv=None):
    """Parse flags and build the mosaics."""
    args = start_stage(build_parser(), argv)
    run(Run(args.run), settings_from(Settings, args), args=vars(args))


if __name__ == "__main__":
    main()
