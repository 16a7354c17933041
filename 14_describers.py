"""Stage 14 — which describer explains this model's neurons best: two describers (two VLMs, two
prompt files, two settings of the offline describer) describe the same mosaics, and 09's
verification scores both sentences of every neuron against its activations.

The thesis compared its candidate describers (§4.2.1) and its prompts before and after
re-prompting (§4.2.3) by reading their sentences; this stage makes that comparison measurable. It
runs on request (`make describe-compare DESCRIBERS="a b"`), after 01–04.

Reads (see ARTEFACTS.md), in the run folder (--run): 02_mosaics.csv (+ PNGs), 01_activations.npz,
01_predictions.csv, 01_images.csv and 01_stats/ (what verification needs), 03_descriptions.csv and
04's files (read by the shared verification inputs, common/verification.py).
Writes into <run>/14_describers/:
  <name>/03_descriptions.csv   each describer's sentences (03's format, journal and meta: an
                               interrupted comparison resumes where it stopped)
  neurons.csv                  per neuron: both sentences side by side, each one's verification
                               (verify_corr) and its control's, and which one wins
  summary.csv                  per layer and describer: neurons verified, mean verify_corr and
                               control_corr, share beating its control, wins and ties
  report.md, report.html       the summary in words and tables
  14_describers.meta.json

A describer is written as one word (DESCRIBERS holds two, space-separated):
  a prompt file (.yaml, .yml or .json)   the run's describer (03's flags) with these prompts
  offline, offline:model, offline:reference
                                         the offline describer; after the colon, its namer
  hf:<folder or hub id>                  a Hugging Face VLM (03's --backend hf --model …)
  openai:<model>                         the OpenAI-compatible server at the run's BASE_URL
A neuron is won by the sentence with the higher verify_corr (a sentence that could not be verified
loses to one that could; equal correlations are a tie; neither verified: not counted).

Example:
  python 14_describers.py --run data/demo --describers "offline:model offline:reference"
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from common import artefacts
from common import render as doc
from common.artefacts import Run, columns, read_stats
from common.cli import (StageError, add_run, add_settings, exit_on_stage_error, setting,
                        settings_from, stage_parser, start_stage)
from common.describers import DescriberSettings, describe, parse_describe_args
from common.io import safe_name, sweep_temporaries, write_csv
from common.provenance import read_meta, retract_meta, write_meta
from common.threads import single_threaded
from common.scores import test_half
from common.verification import check_layer, load_matcher, read_inputs, score_sentences

log = logging.getLogger("neuron-atlas.14_describers")

STAGE = "14_describers"
PROMPT_SUFFIXES = (".yaml", ".yml", ".json")
BACKENDS = ("hf", "openai")  # describers named as <backend>:<model>
NAMERS = ("model", "reference")  # offline:<namer>


@dataclasses.dataclass(frozen=True)
class Settings:
    """Stage 14's settings: one flag each, defaults written here only."""

    describers: str = setting(
        "", "the two describers compared, space-separated: prompt files, offline[:namer], "
        "hf:<model> or openai:<model>", make="DESCRIBERS")
    describe_args: str = setting(
        "--backend offline", "the run's 03 describer flags (03_describe.py --help), the base each "
        "describer changes (make passes them)")
    matcher: str = setting(
        "offline", "concept matcher of the verification, as 09's --matcher", make="MATCHER")
    text_model: str = setting("all-MiniLM-L6-v2", "offline matcher: text embedder of sentences "
                              "and class names", make="TEXT_EMBEDDER")
    seed: int = setting(0, "seed of the control sentences")
    device: str = setting("auto", "auto (cuda if present), cpu, cuda …", make="DEVICE")
    workers: int = setting(2, "offline matcher: processes measuring the images", make="WORKERS")


@dataclasses.dataclass(frozen=True)
class Describer:
    """One of the two describers: its name (a folder name), the word that named it, and the
    describer settings it stands for."""

    name: str
    spec: str
    settings: DescriberSettings


def parse_describer(spec: str, base: DescriberSettings) -> Describer:
    """The describer one word of DESCRIBERS names, as changes to the run's own ``base``."""
    path = Path(spec)
    if path.suffix.lower() in PROMPT_SUFFIXES:
        if not path.is_file():
            raise StageError(f"DESCRIBERS: prompt file {spec!r} not found; give an existing "
                             f".yaml or .json prompt file (like common/prompts.yaml)")
        return Describer(safe_name(path.stem, "prompts"), spec,
                         dataclasses.replace(base, prompts=str(path)))
    head, _, rest = spec.partition(":")
    if head == "offline":
        namer = rest or base.namer
        if namer not in NAMERS:
            raise StageError(f"DESCRIBERS: {spec!r}: the offline describer's namer is one of "
                             f"{', '.join(NAMERS)} (offline:reference)")
        return Describer(f"offline-{namer}", spec,
                         dataclasses.replace(base, backend="offline", namer=namer))
    if head in BACKENDS and rest:
        return Describer(safe_name(f"{head}-{Path(rest.rstrip('/')).name}", head), spec,
                         dataclasses.replace(base, backend=head, model=rest))
    raise StageError(f"DESCRIBERS: {spec!r} names no describer; use a prompt file (.yaml/.json), "
                     f"offline, offline:reference, hf:<folder or hub id> or openai:<model>")


def parse_describers(text: str, base: DescriberSettings) -> tuple[Describer, Describer]:
    """The two describers of DESCRIBERS, with distinct folder names."""
    words = text.split()
    if len(words) != 2:
        raise StageError(f"DESCRIBERS needs two describers separated by a space, got "
                         f"{len(words)} ({text!r}); e.g. DESCRIBERS=\"offline:model "
                         f"offline:reference\" or DESCRIBERS=\"prompts_a.yaml prompts_b.yaml\"")
    a, b = (parse_describer(word, base) for word in words)
    if a.settings == b.settings:
        raise StageError(f"DESCRIBERS: {words[0]!r} and {words[1]!r} are the same describer "
                         f"with the same settings; name two different ones")
    if a.name == b.name:
        a, b = (dataclasses.replace(d, name=f"{d.name}-{i}") for i, d in ((1, a), (2, b)))
    return a, b


def winner(corr_a: float, corr_b: float) -> str:
    """"a", "b", "tie" or "" (neither verified) by verify_corr; NaN is not verified."""
    ok_a, ok_b = math.isfinite(corr_a), math.isfinite(corr_b)
    if not (ok_a or ok_b):
        return ""
    if ok_a != ok_b:
        return "a" if ok_a else "b"
    return "a" if corr_a > corr_b else "b" if corr_b > corr_a else "tie"


def verification(inputs, descriptions: dict, settings: Settings, match,
                 stats: dict[str, np.ndarray]) -> dict:
    """(layer, channel) → (verify_corr, control_corr) of one describer's sentences, by 09's
    verification (common/verification.py) on the run's usable images; NaN where a sentence was
    not verified. ``stats``: layer → per-image maxima of the usable images (``layer_maxima``),
    read once for both describers."""
    inputs = dataclasses.replace(inputs, descriptions=descriptions)
    sentences, matrix = score_sentences(inputs, {}, [], None, match, settings.seed)
    usable_ids = np.flatnonzero(inputs.usable)
    test = test_half(len(usable_ids), settings.seed)  # 09's halves: the same figures as 09's
    out = {}
    for layer in inputs.layers:
        checks = check_layer(sentences[layer], matrix[layer], stats[layer], usable_ids, test, alpha=0.5,
                             bootstrap=0, seed=[settings.seed])  # r only: no interval needed
        for (channel, _), (_, mine, ctrl, _) in checks.items():
            out[(layer, channel)] = (mine["corr"] if mine else math.nan,
                                     ctrl["corr"] if ctrl else math.nan)
    return out


def layer_maxima(inputs) -> dict[str, np.ndarray]:
    """Layer → 01's per-image maxima of the usable images (rows in image-id order)."""
    usable_ids = np.flatnonzero(inputs.usable)
    return {layer: np.asarray(read_stats(inputs.stats_dir, layer, "max"))[usable_ids]
            for layer in inputs.layers}


def compare_rows(inputs, names: tuple[str, str], described: tuple[dict, dict],
                 scores: tuple[dict, dict]) -> list[dict]:
    """One row per neuron of the run's layers: both sentences, their scores and the winner."""
    rows = []
    for layer in inputs.layers:
        for channel in range(inputs.tops[layer].channels):
            key = (layer, channel)
            row = {"layer": layer, "channel": channel,
                   "describer_a": names[0], "describer_b": names[1]}
            corr = {}
            for side, d, s in zip("ab", described, scores):
                desc = d.get(key)
                row[f"sentence_{side}"] = desc.description if desc is not None and desc.ok else ""
                corr[side], ctrl = s.get(key, (math.nan, math.nan))
                row[f"verify_corr_{side}"] = _num(corr[side])
                row[f"control_corr_{side}"] = _num(ctrl)
            row["winner"] = {"a": names[0], "b": names[1]}.get(
                winner(corr["a"], corr["b"]), winner(corr["a"], corr["b"]))
            rows.append(row)
    return rows


def summary_rows(rows: list[dict], layers: list[str], names: tuple[str, str]) -> list[dict]:
    """Per layer (and "all") and describer: how its sentences verify and how often they win."""
    out = []
    for layer in [*layers, "all"]:
        mine = [r for r in rows if layer in ("all", r["layer"])]
        for side, name in zip("ab", names):
            corr = [r[f"verify_corr_{side}"] for r in mine if r[f"verify_corr_{side}"] != ""]
            pairs = [(r[f"verify_corr_{side}"], r[f"control_corr_{side}"]) for r in mine
                     if r[f"verify_corr_{side}"] != "" and r[f"control_corr_{side}"] != ""]
            out.append({
                "layer": layer, "describer": name, "neurons": len(mine), "verified": len(corr),
                "mean_verify_corr": _num(float(np.mean(corr)) if corr else math.nan),
                "mean_control_corr": _num(float(np.mean([c for _, c in pairs]))
                                          if pairs else math.nan),
                "share_beating_control": _num(float(np.mean([v > c for v, c in pairs]))
                                              if pairs else math.nan, 3),
                "wins": sum(r["winner"] == name for r in mine),
                "ties": sum(r["winner"] == "tie" for r in mine)})
    return out


def _num(value: float, digits: int = 4):
    """A float rounded for the CSV; NaN becomes an empty cell."""
    return "" if value is None or not math.isfinite(value) else round(float(value), digits)


def report_blocks(describers: tuple[Describer, Describer], summary: list[dict],
                  rows: list[dict], matcher: str) -> list[dict]:
    """The report: what was compared, the per-layer table, and a few neurons side by side."""
    a, b = describers
    blocks = [doc.paragraph(
        f"Describer a: {a.name} ({a.spec}); describer b: {b.name} ({b.spec}). Both described the "
        f"same mosaics; each sentence was verified as in stage 09 (matcher: {matcher}): "
        f"verify_corr is the correlation of the matcher's scores for the sentence with the "
        f"neuron's activation on images its mosaic did not show, control_corr the same for "
        f"another neuron's sentence by the same describer. A neuron is won by the sentence with "
        f"the higher verify_corr.")]
    total = {r["describer"]: r for r in summary if r["layer"] == "all"}
    if total:
        wa, wb = total[a.name]["wins"], total[b.name]["wins"]
        lead = a.name if wa > wb else b.name if wb > wa else None
        blocks.append(doc.note(
            f"Over all layers: {a.name} wins {wa} neurons, {b.name} wins {wb}, "
            f"{total[a.name]['ties']} ties. "
            + (f"{lead} describes this model's neurons better by this measure."
               if lead else "Neither describes them better by this measure.")))
    cols = ["layer", "describer", "neurons", "verified", "mean_verify_corr", "mean_control_corr",
            "share_beating_control", "wins", "ties"]
    blocks += [doc.heading("Per layer"),
               doc.table(cols, summary, numeric=cols[2:])]
    shown = sorted((r for r in rows if r["winner"] not in ("", "tie")),
                   key=lambda r: -abs(float(r["verify_corr_a"] or 0) -
                                      float(r["verify_corr_b"] or 0)))[:10]
    if shown:
        blocks += [doc.heading("Neurons where the two differ most"),
                   doc.table(["layer", "channel", "sentence_a", "verify_corr_a", "sentence_b",
                              "verify_corr_b", "winner"], shown,
                             numeric=["channel", "verify_corr_a", "verify_corr_b"])]
    return blocks


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of stage 14: ``--run`` and the fields of ``Settings``."""
    p = stage_parser(__doc__.split("\n\n")[0])
    add_run(p, "02's mosaics, 01's files, 03_descriptions.csv and 04's files",
            "14_describers/")
    add_settings(p, Settings)
    return p


@single_threaded  # BLAS on one thread, parallel in processes (--workers): common/threads.py
def run(run: Run, settings: Settings = Settings(), matcher_obj=None, describer_objs=None,
        args: dict | None = None) -> dict:
    """Describe ``run``'s mosaics with both describers, verify both sets of sentences and write
    14_describers/. ``matcher_obj`` and ``describer_objs`` (two describers as
    ``common.describers.describe`` takes them) replace the ones that would be loaded — tests pass
    small ones. Returns {"neurons": rows, "summary": rows}."""
    base = parse_describe_args(settings.describe_args)
    describers = parse_describers(settings.describers, base)
    if settings.matcher != "offline" and settings.matcher.split(":")[0] != "clip":
        raise StageError(f"--matcher {settings.matcher!r}: use offline, clip or clip:<model>")
    for path, producer in ((run.mosaics, "02_mosaics"), (run.crop_vectors, "04_embed")):
        if not Path(path).exists():
            raise StageError(f"{path} does not exist; run {producer} first (e.g. `make all`)")
    folder = run.describer_dir
    meta_file = run.describer_meta
    folder.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(folder)
    retract_meta(meta_file)
    inputs = read_inputs(run)  # refuses inputs of different runs before any describing

    described, out_metas = [], {}
    for i, d in enumerate(describers):
        out = run.described_by(d.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        log.info("describer %s (%s) → %s", d.name, d.spec, out)
        describe(run.mosaics, out, d.settings, run.activations, run.predictions,
                 describer=describer_objs[i] if describer_objs else None,
                 args={"describer": d.spec, **dataclasses.asdict(d.settings)})
        described.append({r.key: r for r in artefacts.read_descriptions(out)})
        out_metas[d.name] = read_meta(out).get("fingerprint", "")

    match = matcher_obj or load_matcher(settings.matcher, inputs, settings.text_model,
                                        settings.device, settings.workers)
    stats = layer_maxima(inputs)
    scores = [verification(inputs, desc, settings, match, stats) for desc in described]
    names = (describers[0].name, describers[1].name)
    rows = compare_rows(inputs, names, tuple(described), tuple(scores))
    summary = summary_rows(rows, inputs.layers, names)
    write_csv(run.describer_neurons, rows, columns(artefacts.DescriberNeuron))
    write_csv(run.describer_summary, summary, columns(artefacts.DescriberSummary))
    reports = doc.write_report(folder, "Describer comparison",
                               report_blocks(describers, summary, rows, match.name))
    write_meta(meta_file, STAGE, dict(args or {}),
               outputs=[run.describer_neurons, run.describer_summary, *reports],
               inputs=inputs.metas, matcher=match.name,
               describers={d.name: d.spec for d in describers},
               describer_runs=out_metas)  # not lineage: both are runs of 03's describing
    for r in summary:
        if r["layer"] == "all":
            log.info("%s: %d neurons verified, mean verify_corr %s, wins %d, ties %d",
                     r["describer"], r["verified"], r["mean_verify_corr"], r["wins"], r["ties"])
    log.info("comparison → %s", folder / "report.html")
    return {"neurons": rows, "summary": summary}


@exit_on_stage_error
def main(argv=None):
    """Parse flags and compare the two describers."""
    args = start_stage(build_parser(), argv, keep_memory=True)
    run(Run(args.run), settings_from(Settings, args), args=vars(args))


if __name__ == "__main__":
    main()
