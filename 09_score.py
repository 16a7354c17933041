"""Stage 09 — how far to trust each neuron's description: triage, interpretability, sub-concepts
and verification on held-out images.

Reads (see ARTEFACTS.md), in the run folder (--run), 01_activations.npz, 01_stats/,
01_images.csv, 01_predictions.csv, 02_mosaics.csv (+ PNGs), 03_descriptions.csv,
04_embeddings.npz and 04_crops.npz (the vector 04's image embedder gave each top crop).
Writes 09_scores.csv (one row per neuron and per sub-concept), 09_summary.csv (one row per layer),
09_eval.csv (final-layer benchmark; no rows unless the layers include the classifier's output),
09_candidates.csv (every candidate sentence, its score, source and iteration), 09_subconcepts/
(sub-concept mosaics, their index and their descriptions) and 09_score.meta.json.

1. Triage (common/triage.py, no forward pass): SIEVE selectivity, DnR top-k log score, dead flag.
   SIEVE's selection: neurons not dead and with selectivity ≥ --select (0: off); the count each
   β of SELECT_SWEEP would keep is logged per layer.
2. Interpretability (SemanticLens §3.5) of each neuron's top crops, with the vectors 04's image
   embedder gave them (04_crops.npz): clarity, polysemanticity, redundancy.
3. Sub-concepts (SIEVE): the top-20 crops of every selected neuron (at least --poly-threshold
   polysemantic; 0: all) are clustered agglomeratively, the silhouette choosing 1–3 groups
   (common.scores.sub_concepts); a neuron with 2–3 groups gets a mosaic and a sentence per group
   from the run's describer (common/describers.py, with 03's describer arguments:
   --describe-args), in the background.
4. Verification, on the test half of the usable images (common.scores.test_half; the selection
   half is kept for ranking candidate sentences): a concept matcher scores every image for the
   sentence; Pearson correlation and AUPRC against the neuron's per-image maximum on images outside
   the sentence's mosaic, beside the same for a control sentence (another neuron of the layer,
   seeded); the margin over the control with a paired bootstrap interval and the verdict; SIEVE's
   Activation Rate and its filter of hypotheses per layer; DnR's semantic consistency.
   Before that, Describe-and-Refine's loop (common/refinement.py) chooses each sentence among
   candidates on the selection half: 03's, the sub-concepts', the user's (--concepts) and, up to
   --refine times, the describer's answer on a mosaic of the images the best one misses.
5. Final-layer benchmark: cosine (all-mpnet-base-v2) of each output neuron's sentence with its
   class name, beside a shuffled-sentence control.

Example:
  python 09_score.py --run data/demo --describe-args "--backend offline"
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.artefacts import (CandidateRow, Mosaic, Run, ScoreRow, SummaryRow, columns,
                              layer_dir, read_stats)
from common.cli import (ModelAgain, StageError, add_run, add_settings, exit_on_stage_error, setting,
                        settings_from, stage_parser, start_stage)
from common.describers import Describing, parse_describe_args
from common.generation import GeneratorSettings
from common.io import sweep_temporaries, temp_dir, write_bytes, write_csv
from common.provenance import retract_meta, write_meta
from common.threads import single_threaded
from common.refinement import Request, Unit, refine
from common.verification import (RunInputs, Sentence, check_layer, load_matcher, pick_controls,
                                 positives, read_inputs, score_sentences, verify)

log = logging.getLogger("neuron-atlas.09_score")

STAGE = "09_score"
SCORE_FIELDS = columns(ScoreRow)  # 09_scores.csv and 09_summary.csv: the readers' own columns
SUMMARY_FIELDS = columns(SummaryRow)
EVAL_FIELDS = ["layer", "channel", "class_name", "description", "cosine", "shuffled_cosine",
               "shuffled_from", "embedder"]
SUB_FIELDS = columns(Mosaic)  # 02's index columns and the tiles' ranks
CANDIDATE_FIELDS = columns(CandidateRow)
PUBLISHED = {"DnD": 0.459, "MILAN": 0.279}  # ResNet-50 ImageNet fc, mpnet cosine (issue 12)
ROOT = Path(__file__).resolve().parent
POLY_THRESHOLD = 0.0   # cluster the crops of every selected neuron (SIEVE); higher: only neurons at
                       # least this polysemantic (0.6: about the most polysemantic quarter of the
                       # demo's), fewer describer calls
TOP_PATCHES = 20       # SIEVE clusters each neuron's top 20 patches
SELECT_SWEEP = (2, 4, 6, 8, 10, 12)  # β values whose neuron counts 09 prints (SIEVE's Table 5: 4–12)
MISS_PX = 112          # px per image in the mosaic of a sentence's misses (4 × 4: a VLM's 448 px)


# ---------------------------------------------------------------------------------------------
# Interpretability of the top crops


def neuron_crops(inputs: RunInputs, layer: str, channel: int, n_crops: int) -> list[np.ndarray]:
    """The neuron's first ``n_crops`` crops, cut from its mosaic (best first)."""
    m = inputs.mosaics.get((layer, channel))
    return m.tiles(n_crops) if m is not None and m.n_tiles else []


# ---------------------------------------------------------------------------------------------
# Sub-concepts


def write_subconcept_mosaics(inputs: RunInputs, groups: dict, run: Run,
                             metas: list[dict]) -> Path:
    """One mosaic per sub-concept (its crops, best first, in a square grid) and their index CSV.

    ``groups``: (layer, channel) → labels of its first crops (0-based groups). Index rows name the
    sub-concept ``<layer>#<s>`` (s = 1, 2, 3) with the neuron's channel, so that the describer sees
    one neuron per sub-concept, and give its tiles' ranks in the neuron's top-k list, so that it
    knows which images they are (and reuses 01's predictions where a tile is the whole image).
    Returns the index path.
    """
    from common.mosaics import paste_tiles, png_bytes
    folder = run.subconcepts
    retract_meta(run.subconcept_meta)
    for old in folder.glob("*/"):
        if old.is_dir():
            shutil.rmtree(old)
    rows = []
    for (layer, channel), labels in groups.items():
        tiles = neuron_crops(inputs, layer, channel, len(labels))
        tile_px = inputs.mosaics[(layer, channel)].tile_px
        for s in range(int(labels.max()) + 1):
            ranks = np.flatnonzero(labels == s)
            members = [tiles[i] for i in ranks]
            grid = math.ceil(math.sqrt(len(members)))
            mosaic, placed = paste_tiles(enumerate(members), grid, tile_px)
            path = layer_dir(folder, layer) / f"{channel}_{s + 1}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(path, png_bytes(mosaic))
            rows.append({"layer": f"{layer}#{s + 1}", "channel": channel,
                         "path": os.path.relpath(path, folder), "n_tiles": placed,
                         "grid": grid, "tile_px": tile_px, "crop": "subconcept",
                         "ranks": " ".join(str(int(r)) for r in ranks[:placed])})
    index = run.subconcept_mosaics
    write_csv(index, rows, SUB_FIELDS)
    write_meta(run.subconcept_meta, "09_subconcepts", {}, outputs=[index],
               inputs=metas, n_mosaics=len(rows))
    return index


# ---------------------------------------------------------------------------------------------
# Verification (the measurement itself is common/verification.py's, shared with 14)


def sieve_filter(rows: list[dict], groups: dict, layers: list[str]) -> dict[str, tuple]:
    """SIEVE's filter of hypotheses, per layer, in place: a hypothesis is a selected neuron's
    sentence when its crops form one group, else each of its sub-concepts' sentences; those with
    an Activation Rate below the layer's mean are discarded (``ar_kept`` 0) and the mean is
    recomputed over the rest → layer → (mean AR, kept flags, mean AR kept)."""
    from common.scores import mean_filter
    out = {}
    for layer in layers:
        hypotheses = [r for r in rows if r["layer"] == layer and r["selected"]
                      and r.get("activation_rate", "") != ""
                      and bool(r["subconcept"]) == ((layer, r["channel"]) in groups)]
        mean, kept, mean_kept = mean_filter(np.array([r["activation_rate"] for r in hypotheses],
                                                     np.float64))
        for r, k in zip(hypotheses, kept):
            r["ar_kept"] = int(k)
        out[layer] = (mean, kept, mean_kept)
    return out



# ---------------------------------------------------------------------------------------------
# Refinement (Describe-and-Refine's loop: common/refinement.py)


def starting_units(inputs: RunInputs, sentences: dict[str, list[Sentence]], usable_ids: np.ndarray,
                   selection: np.ndarray, concepts: list[str]) -> list[Unit]:
    """One unit per sentence to verify, with its starting candidates in order: its own sentence
    (03's, or the sub-concept's), for a neuron its sub-concepts' sentences, then the user's
    concepts; each scored on the selection half minus the images its mosaic showed."""
    units = []
    for layer, sents in sentences.items():
        subs: dict[int, list[str]] = {}
        for s in sents:
            if s.subconcept and s.text:
                subs.setdefault(s.channel, []).append(s.text)
        for s in sents:
            offered = [(s.text, "sentence" if not s.subconcept else "subconcept")] if s.text else []
            if not s.subconcept:
                offered += [(t, "subconcept") for t in subs.get(s.channel, [])]
            offered += [(t, "user") for t in concepts]
            candidates, seen = [], set()
            for text, source in offered:
                if text not in seen:
                    seen.add(text)
                    candidates.append((text, source))
            if not candidates:
                continue
            row = inputs.descriptions.get((layer, s.channel))
            units.append(Unit(layer, s.channel, s.subconcept, getattr(row, "level", 0) or 1,
                              ~np.isin(usable_ids, s.shown) & selection, s.text, candidates))
    return units


def miss_asker(run: Run, inputs: RunInputs, settings, usable_ids: np.ndarray, folder: Path,
               describer=None):
    """The describer's side of the loop: ``ask(requests)`` tiles each request's missed images
    (as the network saw them, MISS_PX a side) into a mosaic in ``folder`` and has the run's
    describer (``settings``: 03's flags; ``describer`` replaces it — tests pass fakes) describe
    them with the level's prompt and the missing sentence → one answer per request ("" where it
    failed). The describer is loaded on the first call only."""
    from common.describers import (Neuron, clean_answer, is_reference_model, load_prompts,
                                   make_describer)
    from common.images import BadImage, load_rgb, network_input
    from common.mosaics import paste_tiles, png_bytes
    from common.refinement import refine_prompt
    prompts = load_prompts(settings.prompts)
    tiles: dict[int, np.ndarray | None] = {}
    made = {"describer": describer, "mosaics": 0}

    def tile(image_id: int) -> np.ndarray | None:
        """The image as the network saw it, MISS_PX a side (None when it cannot be read)."""
        if image_id not in tiles:
            try:
                img = load_rgb(inputs.image_paths[image_id])[0]
                tiles[image_id] = np.asarray(network_input(img, MISS_PX))
            except BadImage as err:
                log.warning("image %d left out of a mosaic of misses: %s", image_id, err)
                tiles[image_id] = None
        return tiles[image_id]

    def ask(requests: list[Request]) -> list[str]:
        """One answer per request, the describer called in its batches."""
        if made["describer"] is None:
            meta01 = inputs.metas[0]
            made["describer"] = make_describer(settings, len(prompts["levels"]), run.predictions,
                                               is_reference_model(meta01), meta01)
        neurons = []
        for r in requests:
            ids = usable_ids[r.rows]
            grid = math.ceil(math.sqrt(len(ids)))
            mosaic, _ = paste_tiles(((k, tile(int(i))) for k, i in enumerate(ids)), grid, MISS_PX)
            made["mosaics"] += 1
            path = folder / f"{made['mosaics']}.png"
            write_bytes(path, png_bytes(mosaic))
            u = r.unit
            neurons.append(Neuron(layer=u.layer, channel=u.channel, level=u.level, mosaic=path,
                                  grid=grid, tile_px=MISS_PX, n_tiles=len(ids),
                                  prompt=refine_prompt(prompts, u.level, r.sentence,
                                                       settings.domain, settings.keywords),
                                  top_ids=ids, whole=np.ones(len(ids), bool)))
        d = made["describer"]
        size = max(1, settings.batch_size or getattr(d, "batch_size", 16))
        answers = []
        for start in range(0, len(neurons), size):
            answers += ["" if error else clean_answer(raw)[0]
                        for raw, error in d.describe(neurons[start:start + size])]
        return answers
    return ask


def candidate_rows(units: list[Unit]) -> list[dict]:
    """09_candidates.csv: every candidate of every unit, in the order the loop scored them."""
    return [{"layer": u.layer, "channel": u.channel, "subconcept": u.subconcept or "",
             "iteration": r["iteration"], "source": r["source"], "description": r["description"],
             "selection_corr": _num(r["score"]), "chosen": int(i == u.best)}
            for u in units for i, r in enumerate(u.records)]


# ---------------------------------------------------------------------------------------------
# Final-layer benchmark


def output_layer(inputs: RunInputs, n_classes: int) -> str | None:
    """The chosen layer that is the classifier's output (1 × 1 map, one channel per class)."""
    for layer in inputs.layers:
        fmap = inputs.tops[layer].fmap
        if int(fmap[0]) == n_classes and int(fmap[1]) == int(fmap[2]) == 1:
            return layer
    return None


def final_layer_eval(layer: str, descriptions: dict[int, str], class_names: list[str],
                     embedder, seed: int) -> list[dict]:
    """Per output neuron with a sentence: cosine with its class name, and the cosine of a shuffled
    sentence (another output neuron's, a seeded derangement) with the same name."""
    channels = sorted(c for c, text in descriptions.items() if text and c < len(class_names))
    if len(channels) < 2:
        return []
    rng = np.random.default_rng(seed)
    shift = rng.permutation(len(channels))
    shuffled = np.roll(shift, 1)  # a cyclic shift of a permutation: no neuron keeps its own
    donor = np.empty(len(channels), np.int64)
    donor[shift] = shuffled
    texts = [descriptions[c] for c in channels]
    names = [class_names[c].replace("_", " ") for c in channels]
    t, n = embedder.encode(texts), embedder.encode(names)
    cos = (t * n).sum(axis=1)
    shuffled_cos = (t[donor] * n).sum(axis=1)
    return [{"layer": layer, "channel": c, "class_name": names[i], "description": texts[i],
             "cosine": round(float(cos[i]), 4), "shuffled_cosine": round(float(shuffled_cos[i]), 4),
             "shuffled_from": channels[donor[i]], "embedder": embedder.name}
            for i, c in enumerate(channels)]


def eval_report(rows: list[dict], backend: str, layer: str | None) -> str:
    """The benchmark as printed text: our mean cosine, the shuffled control, published figures,
    and whether the describer read class names (which makes the benchmark circular)."""
    if not rows:
        return ("final-layer benchmark: no chosen layer is the classifier's output (one neuron per "
                "class); add it to LAYERS (EfficientNet-Lite0: _fc; ResNets: fc) to run it")
    mean = np.mean([r["cosine"] for r in rows])
    control = np.mean([r["shuffled_cosine"] for r in rows])
    published = ", ".join(f"{k} {v:.3f}" for k, v in PUBLISHED.items())
    lines = [f"final-layer benchmark on {layer} ({len(rows)} output neurons, {rows[0]['embedder']} "
             f"cosine of sentence and class name): {mean:.3f}; shuffled sentences {control:.3f}; "
             f"published (ResNet-50 ImageNet fc): {published}"]
    if backend == "offline":
        lines.append("CIRCULAR: the offline describer writes the class names the reference "
                     "classifier gives each neuron's top images, so its sentences contain class "
                     "names; the figure measures that, not description quality, and is not "
                     "comparable with the published ones")
    else:
        lines.append(f"describer backend {backend}: it saw only the mosaics, no class names")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class Settings(ModelAgain, GeneratorSettings):
    """Stage 09's settings: one flag each (``--poly-threshold`` …), defaults written here only;
    the model flags (``ModelAgain``) are needed only with ``--generator diffusers``
    (``GeneratorSettings``)."""

    poly_threshold: float = setting(
        POLY_THRESHOLD, "neurons with at least this polysemanticity are split into sub-concepts",
        make="POLY")
    max_subconcepts: int = setting(3, "most groups a neuron's crops are split into",
                                   choices=(2, 3))
    describe_args: str = setting(
        "--backend offline", "03's describer flags (03_describe.py --help) for the sub-concept "
        "sentences: the same describer as the neurons' (make passes them)")
    matcher: str = setting(
        "offline", "concept matcher of the verification: offline, clip (ViT-B/32), or "
        "clip:<model> — any CLIP-like model 04 can load (docs/vlm-families.md): "
        "clip:open_clip:<arch>:<file>, clip:hf:<folder> (CLIP or SigLIP)", make="MATCHER")
    text_model: str = setting("all-MiniLM-L6-v2", "offline matcher: text embedder of sentences "
                              "and class names", make="TEXT_EMBEDDER")
    eval_model: str = setting("all-mpnet-base-v2", "final-layer benchmark embedder")
    select: float = setting(
        0.0, "SIEVE's selection: only neurons whose selectivity (p99 / median) is at least this "
        "are clustered into hypotheses and given an Activation Rate (the paper's 10; 0: every "
        "neuron that is not dead)", make="SELECT")
    bootstrap: int = setting(1000, "resamples of the test-half images behind the margin's "
                             "95 % interval")
    alpha: float = setting(0.5, "weight of the activation term in DnR's semantic consistency "
                           "(1 − alpha weighs the squared similarity)")
    seed: int = setting(0, "seed of the control sentences, the selection/test halves, the "
                        "bootstrap and the one-cluster reference")
    refine: int = setting(
        3, "Describe-and-Refine: most iterations of asking the describer about the images the "
        "best sentence misses (scored on the selection half; stops when one does not improve "
        "it; 0: no refinement, the first sentence stays)", make="REFINE")
    concepts: str = setting(
        "", "file of concept phrases, one per line, each a candidate sentence of every neuron "
        "(empty: none)", make="CONCEPTS")
    device: str = setting("auto", "auto (cuda if present), cpu, cuda …", make="DEVICE")
    workers: int = setting(2, "offline matcher: processes measuring the images", make="WORKERS")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of stage 09: ``--run`` and the fields of ``Settings``."""
    p = stage_parser(__doc__.split("\n")[0])
    add_run(p, "01's files, 02_mosaics.csv, 03_descriptions.csv, 04_embeddings.npz and "
            "04_crops.npz", "09_scores.csv, 09_summary.csv, 09_eval.csv and 09_subconcepts/")
    add_settings(p, Settings)
    return p


def _num(value: float, digits: int = 4):
    """A float rounded for the CSV; NaN becomes an empty cell."""
    return "" if value is None or not np.isfinite(value) else round(float(value), digits)


def _mean(values) -> float:
    """Mean of the finite values (NaN when none)."""
    arr = np.array([v for v in values if v != "" and v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def rate_on_generated(rendered: list, inputs: RunInputs, settings: Settings, run: Run) -> dict:
    """GENERATOR=diffusers: replace each row's Activation Rate by the one measured on images
    rendered for its sentence (``settings.generate_n`` each, seeded; a sentence shared by several
    neurons is rendered once) → what the meta records of it. ``rendered``: (row, the held-out
    positives, the held-out activations, the sentence) of every verified sentence."""
    from common.generation import responses
    from common.provenance import read_meta
    from common.rerun import load_run_model
    from common.scores import generated_activation_rate
    started = time.perf_counter()
    texts = list(dict.fromkeys(text for *_, text in rendered))
    images = settings.renderer(settings.device).render(texts, settings.generate_n, settings.seed)
    bundle = load_run_model(read_meta(run.activations), device=settings.device,
                            **settings.model_again())
    flat = [image for text in texts for image in images[text]]
    found = responses(bundle, flat, inputs.layers)
    start = {text: i * settings.generate_n for i, text in enumerate(texts)}
    for row, positive, activation, text in rendered:
        i = start[text]
        rate = generated_activation_rate(
            positive, activation, found[row["layer"]][i:i + settings.generate_n, row["channel"]])
        row["activation_rate"] = "" if not np.isfinite(rate) else round(rate, 4)
    seconds = time.perf_counter() - started
    log.info("Activation Rate on generated images: %d sentences × %d images by %s (%d steps) in "
             "%.1f s", len(texts), settings.generate_n, settings.generator_model,
             settings.generate_steps, seconds)
    return {**settings.described(), "sentences": len(texts)}  # no time: metas are deterministic


@single_threaded  # BLAS on one thread, parallel in processes (--workers): common/threads.py
def run(run: Run, settings: Settings = Settings(), matcher_obj=None, eval_embedder=None,
        args: dict | None = None, describer_obj=None) -> dict:
    """Score every neuron of ``run``; return {"scores": rows, "summary": rows, "eval": rows,
    "candidates": rows}.

    ``matcher_obj``, ``eval_embedder`` and ``describer_obj`` (the refinement's describer) replace
    the ones this function would load — tests pass small ones.
    """
    from common import scores as S
    from common.concepts import read_concepts
    from common.triage import triage_layer
    describer = parse_describe_args(settings.describe_args)  # refused now, not after the images
    concepts = read_concepts(settings.concepts) if settings.concepts else []
    if settings.refine < 0:
        raise StageError(f"--refine {settings.refine}: give the most refinement iterations, "
                         f"0 or more (0: none)")
    if settings.matcher != "offline" and settings.matcher.split(":")[0] != "clip":
        raise StageError(f"--matcher {settings.matcher!r}: use offline, clip or clip:<model> "
                         f"(e.g. clip:hf:<folder>)")
    poly_threshold, max_subconcepts, seed = (settings.poly_threshold, settings.max_subconcepts,
                                             settings.seed)
    activations, predictions, stats_dir = run.activations, run.predictions, run.stats
    scores_out, summary_out, eval_out = run.scores, run.summary, run.eval
    subconcepts = run.subconcepts
    inputs = read_inputs(run)
    meta_file = run.meta(STAGE)
    sweep_temporaries(scores_out.parent, subconcepts)  # what a killed earlier run left half-written
    retract_meta(meta_file)  # until the new one is written, 09 counts as not done

    # 1. Triage
    triage = {layer: triage_layer(read_stats(stats_dir, layer, "max")) for layer in inputs.layers}

    # 2. Interpretability, on the vectors 04 gave the top crops (no embedding here)
    embedder = inputs.crops.embedder
    vectors = {(layer, c): inputs.crops.of(layer, c)
               for layer in inputs.layers for c in range(inputs.tops[layer].channels)}
    dim = inputs.crops.arrays["vectors"].shape[1]
    interp: dict[tuple[str, int], dict] = {}
    for layer in inputs.layers:
        keys = [(layer, c) for c in range(inputs.tops[layer].channels)]
        means = np.stack([vectors[k].mean(axis=0) if len(vectors[k]) else
                          np.zeros(dim) for k in keys])
        red = S.redundancy(means)
        for k, r in zip(keys, red):
            interp[k] = {"clarity": S.clarity(vectors[k]),
                         "polysemanticity": S.polysemanticity(vectors[k]), "redundancy": r}

    # 3. SIEVE's selection (the p99 / median gate at --select; off at 0: every living neuron) and
    # sub-concepts: the top patches of each selected neuron are clustered, the silhouette choosing
    # 1 to 3 groups; the split, the mosaics and their sentences are made while the matcher
    # measures the images (step 4), in ``split_and_describe``
    selected = {layer: ~triage[layer]["dead"] & (triage[layer]["selectivity"] >= settings.select)
                for layer in inputs.layers}
    sweep = {layer: {beta: int((triage[layer]["selectivity"][~triage[layer]["dead"]] >= beta).sum())
                     for beta in SELECT_SWEEP} for layer in inputs.layers}
    for layer in inputs.layers:
        log.info("%s: neurons selectivity ≥ β (SIEVE's selection), of %d living: %s%s", layer,
                 int((~triage[layer]["dead"]).sum()),
                 ", ".join(f"β {b}: {n}" for b, n in sweep[layer].items()),
                 f"; --select {settings.select:g} keeps {int(selected[layer].sum())}"
                 if settings.select > 0 else " (--select off)")
    candidates = [key for key, values in interp.items()
                  if selected[key[0]][key[1]]
                  and np.isfinite(values["polysemanticity"])
                  and values["polysemanticity"] >= poly_threshold]
    groups: dict[tuple[str, int], np.ndarray] = {}  # neuron → group of each of its first crops
    n_clusters: dict[tuple[str, int], int] = {}     # clustered neuron → groups chosen (1 … 3)
    subconcepts.mkdir(parents=True, exist_ok=True)

    def split_and_describe():
        """Split the candidates' crops into sub-concepts (filling ``groups``), write their
        mosaics and start the describer on them (``Describing``), or None when no neuron splits."""
        for key in candidates:
            rng = np.random.default_rng([seed, zlib.crc32(key[0].encode()), key[1]])
            labels = S.sub_concepts(vectors[key][:TOP_PATCHES], max_subconcepts, rng)
            n_clusters[key] = 1 if labels is None else int(labels.max()) + 1
            if labels is not None:
                groups[key] = labels
        log.info("%d of %d clustered neurons split into sub-concepts (the others keep one "
                 "sentence)", len(groups), len(candidates))
        if not groups:
            return None
        index = write_subconcept_mosaics(inputs, groups, run, inputs.metas)
        levels = {}
        for (layer, channel), labels in groups.items():
            level = getattr(inputs.descriptions.get((layer, channel)), "level", 0) or 1
            for s in range(int(labels.max()) + 1):
                levels[f"{layer}#{s + 1}"] = level
        # The describer reads 01's activations and predictions as for the neurons themselves: the
        # offline one names whole-image tiles by 01's predictions instead of classifying them.
        return Describing(index, run.subconcept_descriptions, describer, levels,
                          activations, predictions)

    # 4. Verification (the neurons' own sentences are scored while the sub-concepts are described)
    match = matcher_obj or load_matcher(settings.matcher, inputs, settings.text_model,
                                        settings.device, settings.workers)
    usable_ids = np.flatnonzero(inputs.usable)
    sentences, matrix = score_sentences(inputs, groups, sorted({layer for layer, _ in candidates}),
                                        split_and_describe if candidates else None, match, seed,
                                        also_keep=inputs.layers if settings.refine or concepts
                                        else ())
    if not candidates:
        log.info("no selected neuron at or above polysemanticity %.2f: no sub-concepts",
                 poly_threshold)

    # Candidates are ranked on the selection half of the held-out images; every figure below is
    # measured on the test half (S.test_half), on the chosen sentence.
    test = S.test_half(len(usable_ids), seed)
    maxima = {layer: np.asarray(read_stats(stats_dir, layer, "max"))[usable_ids]
              for layer in inputs.layers}  # read once: refinement and verification
    first = {(layer, s.channel, s.subconcept): (s.text, matrix[layer][:, i])
             for layer, sents in sentences.items() for i, s in enumerate(sents)}
    started = time.perf_counter()
    units = starting_units(inputs, sentences, usable_ids, ~test, concepts)
    cache = {layer: {s.text: matrix[layer][:, i] for i, s in enumerate(sents) if s.text}
             for layer, sents in sentences.items()}
    # The mosaics of missed images go to a scratch folder in the run folder, where the next run's
    # sweep removes it if this process is killed (one in the system's temporary folder would stay).
    misses = temp_dir(run.folder, "09_misses")
    try:
        refine(units, cache, maxima, settings.refine, match.score_more,
               miss_asker(run, inputs, describer, usable_ids, misses, describer_obj))
    finally:
        shutil.rmtree(misses, ignore_errors=True)
    refine_seconds = time.perf_counter() - started
    by_key = {(s.layer, s.channel, s.subconcept): s for sents in sentences.values() for s in sents}
    for u in units:
        by_key[(u.layer, u.channel, u.subconcept)].text = u.records[u.best]["description"]
    for layer in inputs.layers:  # controls among the final sentences, by the same seeded streams
        pick_controls(sentences[layer], np.random.default_rng([seed, zlib.crc32(layer.encode())]))
    blank = np.zeros(len(usable_ids))
    matrix = {layer: np.stack([cache[layer][s.text] if s.text else blank for s in sents], axis=1)
              if sents else np.zeros((len(usable_ids), 0)) for layer, sents in sentences.items()}
    calls = Counter()
    for u in units:
        calls[(u.layer, u.channel)] += u.calls
    changed = sum(u.records[u.best]["description"] != u.first for u in units)
    log.info("refinement (%d iterations at most, %d user concepts): %d of %d sentences replaced "
             "by a better candidate on the selection half; describer calls per neuron: mean %.2f, "
             "max %d; %.1f s", settings.refine, len(concepts), changed, len(units),
             np.mean(list(calls.values())) if calls else 0.0, max(calls.values(), default=0),
             refine_seconds)

    rows: list[dict] = []
    auprc_beats: dict[tuple[str, int], bool] = {}  # per neuron: AUPRC above its control's
    rendered: list[tuple[dict, np.ndarray, np.ndarray, str]] = []  # GENERATOR=diffusers' rows
    for layer in inputs.layers:
        stats = maxima[layer]
        tri = triage[layer]
        checks = check_layer(sentences[layer], matrix[layer], stats, usable_ids, test,
                             settings.alpha, settings.bootstrap, [seed, zlib.crc32(layer.encode())])
        for channel in range(inputs.tops[layer].channels):
            key = (layer, channel)
            labels = groups.get(key)
            for sub in range(0, (int(labels.max()) + 2) if labels is not None else 1):
                s, mine, ctrl, extra = checks.get((channel, sub), (None, None, None, {}))
                row = {"layer": layer, "channel": channel, "subconcept": sub or "",
                       "share": 1 if sub == 0 else
                       _num(float((labels == sub - 1).mean()), 3),
                       "selectivity": _num(tri["selectivity"][channel]),
                       "dnr_score": _num(tri["dnr_score"][channel]),
                       "dead": int(tri["dead"][channel]),
                       "selected": int(selected[layer][channel]),
                       "crop_clusters": n_clusters.get(key, "") if not sub else "",
                       "clarity": _num(interp[key]["clarity"]),
                       "polysemanticity": _num(interp[key]["polysemanticity"]),
                       "redundancy": _num(interp[key]["redundancy"]),
                       "embedder": embedder, "matcher": match.name,
                       "n_crops": len(vectors[key])}
                if sub:
                    members = vectors[key][:len(labels)][labels == sub - 1]
                    row["clarity"] = _num(S.clarity(members))
                    row["description"] = s.text if s else ""
                    png = layer_dir(subconcepts, layer) / f"{channel}_{sub}.png"
                    row["mosaic"] = os.path.relpath(png, scores_out.parent)
                if s is not None:
                    text, scores = first[(layer, channel, sub)]
                    row["description"] = s.text
                    row["first_description"] = text
                    if text:
                        row["first_corr"] = _num(verify(
                            scores, stats[:, channel],
                            ~np.isin(usable_ids, s.shown) & test)["corr"])
                if mine is not None:
                    row.update({"verify_corr": _num(mine["corr"]),
                                "verify_auprc": _num(mine["auprc"]),
                                "n_held_out": mine["n"], "n_positives": mine["pos"],
                                "activation_rate": _num(extra["ar"]),
                                "dnr_consistency": _num(extra["consistency"])})
                    if settings.generator == "diffusers":
                        held_out = ~np.isin(usable_ids, s.shown) & test
                        rendered.append((row, positives(stats[held_out, channel]),
                                         stats[held_out, channel], s.text))
                if ctrl is not None:
                    control = sentences[layer][s.control]
                    row.update({"control_corr": _num(ctrl["corr"]),
                                "control_auprc": _num(ctrl["auprc"]),
                                "control_channel": control.channel,
                                "control_description": control.text,
                                "margin": _num(extra["margin"]),
                                "margin_low": _num(extra["low"]),
                                "margin_high": _num(extra["high"]),
                                "verdict": S.verdict_level(mine["corr"], extra["margin"],
                                                           extra["low"])})
                    if not sub:
                        auprc_beats[key] = bool(np.isfinite(mine["auprc"]) and (
                            not np.isfinite(ctrl["auprc"]) or mine["auprc"] > ctrl["auprc"]))
                rows.append(row)
    concept_images = {"images": "retrieved: the held-out images the matcher ranks highest"}
    if settings.generator == "diffusers":
        concept_images = rate_on_generated(rendered, inputs, settings, run)
    ar_filter = sieve_filter(rows, groups, inputs.layers)

    summary = []
    for layer in inputs.layers:
        mine = [r for r in rows if r["layer"] == layer and r["subconcept"] == ""]
        verified = [r for r in mine if r.get("verdict", "none") != "none"]
        mean_ar, kept, mean_kept = ar_filter[layer]
        summary.append({
            "layer": layer, "neurons": len(mine), "dead": sum(r["dead"] for r in mine),
            "mean_selectivity": _num(_mean(r["selectivity"] for r in mine)),
            "mean_dnr": _num(_mean(r["dnr_score"] for r in mine)),
            "mean_clarity": _num(_mean(r["clarity"] for r in mine)),
            "mean_polysemanticity": _num(_mean(r["polysemanticity"] for r in mine)),
            "mean_redundancy": _num(_mean(r["redundancy"] for r in mine)),
            "mean_verify_corr": _num(_mean(r.get("verify_corr", "") for r in mine)),
            "mean_control_corr": _num(_mean(r.get("control_corr", "") for r in mine)),
            "share_beating_control": _num(np.mean([r["margin"] > 0 for r in verified])
                                          if verified else float("nan"), 3),
            "matcher": match.name, "embedder": embedder,
            "share_beating_control_auprc": _num(np.mean(
                [auprc_beats[(layer, r["channel"])] for r in verified])
                if verified else float("nan"), 3),
            "share_reliable": _num(np.mean([r["verdict"] == "reliable" for r in verified])
                                   if verified else float("nan"), 3),
            "mean_margin": _num(_mean(r.get("margin", "") for r in mine)),
            "selected": int(selected[layer].sum()),
            "split": sum(1 for key in groups if key[0] == layer),
            "hypotheses": len(kept), "hypotheses_kept": int(np.sum(kept)),
            "mean_ar": _num(mean_ar), "mean_ar_kept": _num(mean_kept),
            "mean_dnr_consistency": _num(_mean(r.get("dnr_consistency", "") for r in mine)),
            "n_selection": int((~test).sum()), "n_test": int(test.sum()),
            "mean_first_corr": _num(_mean(r.get("first_corr", "") for r in mine)),
            "distinct_first": len({r["first_description"] for r in mine
                                   if r.get("first_description")}),
            "distinct_sentences": len({r["description"] for r in mine if r.get("description")})})
    for row in summary:
        log.info("%s: Activation Rate over %d hypotheses %s; %d at or above it kept, mean %s "
                 "(SIEVE's filter)", row["layer"], row["hypotheses"], row["mean_ar"],
                 row["hypotheses_kept"], row["mean_ar_kept"])

    # 5. Final-layer benchmark
    names = inputs.class_names
    layer_out = output_layer(inputs, len(names))
    eval_rows = []
    if layer_out is not None:
        from common.embedders import load_text_embedder
        texts = {c: r.description for (layer, c), r in inputs.descriptions.items()
                 if layer == layer_out and r.status == "ok"}
        eval_rows = final_layer_eval(layer_out, texts, names,
                                     eval_embedder or load_text_embedder(settings.eval_model,
                                                                        device=settings.device),
                                     seed)
    report = eval_report(eval_rows, inputs.describer_backend, layer_out)
    log.info("%s", report)

    write_csv(scores_out, rows, SCORE_FIELDS)
    write_csv(summary_out, summary, SUMMARY_FIELDS)
    write_csv(eval_out, eval_rows, EVAL_FIELDS)
    candidates_out = run.candidates
    candidates = candidate_rows(units)
    write_csv(candidates_out, candidates, CANDIDATE_FIELDS)
    write_meta(meta_file, STAGE, dict(args or {}),
               outputs=[scores_out, summary_out, eval_out, candidates_out], inputs=inputs.metas,
               refine={"iterations": settings.refine, "concepts": len(concepts),
                       "units": len(units),
                       "replaced": changed, "describer_calls_mean": round(float(
                           np.mean(list(calls.values()))) if calls else 0.0, 3),
                       "describer_calls_max": max(calls.values(), default=0)},
               embedder=embedder, embedder_space=inputs.crops.space, matcher=match.name,
               n_subconcept_neurons=len(groups), poly_threshold=poly_threshold,
               select=settings.select, select_sweep=sweep, bootstrap=settings.bootstrap,
               alpha=settings.alpha, halves={"seed": seed, "selection": int((~test).sum()),
                                              "test": int(test.sum())},
               eval_layer=layer_out, eval_report=report, concept_images=concept_images,
               describer_saw_class_names=inputs.describer_backend == "offline")
    for row in summary:
        log.info("%s: %d neurons, %d dead, clarity %s, polysemanticity %s, verify r %s vs control "
                 "%s, %s beat their control", row["layer"], row["neurons"], row["dead"],
                 row["mean_clarity"], row["mean_polysemanticity"], row["mean_verify_corr"],
                 row["mean_control_corr"], row["share_beating_control"])
    return {"scores": rows, "summary": summary, "eval": eval_rows, "candidates": candidates}


@exit_on_stage_error
def main(argv=None):
    """Parse flags and score the neurons."""
    args = start_stage(build_parser(), argv, keep_memory=True)
    run(Run(args.run), settings_from(Settings, args), args=vars(args))


if __name__ == "__main__":
    main()
