"""Stage 04 — text, image and fused embedding of every described neuron.

Reads 03_descriptions.csv (rows with status ok) and 02_mosaics.csv (+ the mosaic PNGs).
Writes 04_embeddings.npz (layer, channel, text, image, fused, text_model, image_model, fusion),
04_crops.npz beside it (the image vector of each of every neuron's top --crop-vectors crops, for
09's interpretability scores; see common.artefacts.CropVectors) and 04_embed.meta.json.

- text: the description through a sentence-transformers model (offline default
  all-MiniLM-L6-v2; on a workstation e.g. sentence-transformers/clip-ViT-L-14).
- image: the mosaic through CLIP ViT-B/32 when its weights are on disk; otherwise the mean
  pooled feature of the reference CNN (EfficientNet-Lite0) over the neuron's top crops, cut
  from the mosaic and fed at their own size. Identical crops (deep layers often share whole
  top images) are computed once.
- crops: the same image embedder on each of the top crops of every neuron of 02's index (the
  CNN's vectors are those the image vector averages, computed once for both).
- fused: the normalised mean of text and image vectors when both come from one space (both
  towers of one CLIP model), else the concatenation of the two L2-normalised halves.

Example:
  python 04_embed.py --run data/demo
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.artefacts import (CropVectors, Embeddings, Mosaic, Run, read_descriptions,
                              read_mosaics, write_crop_vectors, write_embeddings)
from common.cli import (StageError, add_run, add_settings, exit_on_stage_error, setting,
                        settings_from, stage_parser, start_stage)
from common.embedders import embed_distinct_crops, fuse, l2_normalise, same_space
from common.io import sweep_temporaries
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta

log = logging.getLogger("neuron-atlas.04_embed")

STAGE = "04_embed"


@dataclass(frozen=True)
class Settings:
    """Stage 04's settings: one flag each (``--text-model`` …), defaults written here only."""

    text_model: str = setting(
        "all-MiniLM-L6-v2", "sentence-transformers folder or hub id, or clip:<model or path> "
        "(workstation: sentence-transformers/clip-ViT-L-14)", make="TEXT_EMBEDDER")
    image_model: str = setting(
        "auto", "auto (CLIP ViT-B/32 if its weights are on disk, else cnn), cnn, clip, "
        "clip:<model or path>", make="IMAGE_EMBEDDER")
    image_tiles: int = setting(16, "cnn image embedding: top crops averaged per neuron")
    crop_vectors: int = setting(
        20, "top crops per neuron whose own vectors 04_crops.npz keeps (09's clarity, "
        "polysemanticity, redundancy and sub-concepts)")
    device: str = setting("auto", "auto (cuda if present), cpu, cuda …", make="DEVICE")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of stage 04: ``--run`` and the fields of ``Settings``."""
    p = stage_parser(__doc__.split("\n")[0])
    add_run(p, "03_descriptions.csv and 02_mosaics.csv", "04_embeddings.npz and 04_crops.npz")
    add_settings(p, Settings)
    return p


def crop_vectors(embedder, mosaics: list[Mosaic], n_crops: int) -> CropVectors:
    """Every neuron's top ``n_crops`` crops (cut from its mosaic) embedded by
    ``common.embedders.embed_distinct_crops``: at their own size, each distinct crop only once."""
    per_neuron = [[Image.fromarray(t) for t in m.tiles(n_crops)] for m in mosaics]
    vectors, rows = embed_distinct_crops(embedder, [t for tiles in per_neuron for t in tiles],
                                         desc="04 crops")
    return CropVectors.build([m.key for m in mosaics], [len(tiles) for tiles in per_neuron],
                             vectors, rows, embedder.name, embedder.space)


def cnn_image_vectors(crops: CropVectors, mosaics: list[Mosaic], n_tiles: int) -> np.ndarray:
    """Per neuron: the normalised mean of the CNN features of its top ``n_tiles`` crops."""
    out = np.zeros((len(mosaics), crops.arrays["vectors"].shape[1]), np.float32)
    for i, m in enumerate(mosaics):
        mine = crops.of(*m.key)[:n_tiles]
        if len(mine):
            out[i] = mine.mean(axis=0)
    return l2_normalise(out)


def run(run: Run, settings: Settings = Settings(), text_embedder=None, image_embedder=None,
        args: dict | None = None) -> dict[str, np.ndarray]:
    """Embed the described neurons of ``run``; return the arrays written to its
    04_embeddings.npz (the per-crop vectors go to its 04_crops.npz).

    ``text_embedder`` / ``image_embedder`` (objects as made by common.embedders) replace the
    ones loaded from the settings' ``text_model`` / ``image_model`` — tests pass small fakes.
    """
    from common.embedders import load_image_embedder, load_text_embedder
    descriptions, mosaics, out = run.descriptions, run.mosaics, run.embeddings
    image_tiles, crop_vectors_n = settings.image_tiles, settings.crop_vectors
    metas = [read_meta(descriptions), read_meta(mosaics)]
    merge_lineage(metas)  # refuse, before any work, inputs that come from different runs
    described = read_descriptions(descriptions)
    rows = [r for r in described if r.ok]
    n_failed = len(described) - len(rows)
    if not rows:
        raise StageError(f"{descriptions} has no successful descriptions to embed; re-run 03")
    if n_failed:
        log.warning("%d neurons without a description are left out (rerun 03 to retry them)",
                    n_failed)
    every = read_mosaics(mosaics)
    index = {m.key: m for m in every}
    missing = [r.key for r in rows if r.key not in index]
    if missing:
        raise StageError(f"{len(missing)} described neurons have no mosaic in {mosaics} (e.g. "
                         f"{missing[0]}): descriptions and mosaics come from different runs")
    text_embedder = text_embedder or load_text_embedder(settings.text_model,
                                                        device=settings.device)
    image_embedder = image_embedder or load_image_embedder(settings.image_model,
                                                           device=settings.device)

    log.info("text embedding with %s (%d-d)", text_embedder.name, text_embedder.dim)
    text = text_embedder.encode([r.description for r in rows])
    chosen = [index[r.key] for r in rows]
    log.info("image embedding with %s (%s, %d-d)", image_embedder.name, image_embedder.space,
             image_embedder.dim)
    # Crops of every neuron (described or not: 09 scores them all); the CNN's image vector is the
    # mean of the first image_tiles of them, so enough are cut for both.
    n_cut = max(crop_vectors_n, image_tiles) if image_embedder.space == "cnn" else crop_vectors_n
    crops = crop_vectors(image_embedder, every, n_cut)
    if image_embedder.space == "cnn":
        image = cnn_image_vectors(crops, chosen, image_tiles)
    else:
        images = []
        for m in tqdm(chosen, desc="04 mosaics", unit="mosaic", disable=None):
            with Image.open(m.path) as im:
                images.append(im.convert("RGB"))
        image = image_embedder.encode(images)
    shared = same_space(text_embedder, image_embedder)
    fused, rule = fuse(text, image, shared)
    if n_cut > crop_vectors_n:
        crops.arrays["index"] = crops.arrays["index"][:, :crop_vectors_n]
    crops_out = run.crop_vectors
    sweep_temporaries(run.folder)  # what a killed earlier run left half-written
    retract_meta(run.meta(STAGE))
    arrays = write_embeddings(out, Embeddings(
        layer=np.array([r.layer for r in rows]), channel=np.array([r.channel for r in rows]),
        text=text, image=image, fused=fused, text_model=text_embedder.name,
        image_model=image_embedder.name, fusion=rule))
    write_crop_vectors(crops_out, crops)
    why = ("text and image vectors share one CLIP space: their normalised mean" if shared else
           "text and image vectors come from different spaces: normalised halves concatenated")
    write_meta(run.meta(STAGE), STAGE, dict(args or {}),
               outputs=[out, crops_out], inputs=metas,
               text_model=text_embedder.name, image_model=image_embedder.name,
               image_space=image_embedder.space, fusion=rule, fusion_reason=why,
               dims={"text": int(text.shape[1]), "image": int(image.shape[1]),
                     "fused": int(fused.shape[1])},
               n_neurons=len(rows), n_left_out=n_failed, crop_vectors=crop_vectors_n,
               n_distinct_crops=int(len(crops.arrays["vectors"])),
               image_input="mosaic" if image_embedder.space != "cnn" else
               f"mean over the top {image_tiles} crops")
    log.info("%d neurons → %s (text %d-d, image %d-d, fused %s %d-d)", len(rows), out,
             text.shape[1], image.shape[1], rule, fused.shape[1])
    return arrays


@exit_on_stage_error
def main(argv=None):
    """Parse flags and embed the neurons."""
    args = start_stage(build_parser(), argv, keep_memory=True)
    run(Run(args.run), settings_from(Settings, args), args=vars(args))


if __name__ == "__main__":
    main()
