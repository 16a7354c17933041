"""A whole fake run for the atlas tests: the real Makefile on the fake model, with planted text.

The image set makes one confusion that 08 analyses: six bar images filed under class 0 ("red")
are predicted as class 1 ("edgy"), next to ten correct red images. Two descriptions are replaced
by markup that would run if any page inserted model text as HTML, as a misbehaving describer
could write it; a small 09_scores.csv (the columns of stage 09) is added.
"""
from __future__ import annotations

import collections
import subprocess
from pathlib import Path

import numpy as np

from common.artefacts import CandidateRow, ScoreRow, SummaryRow, columns
from common.io import read_csv, read_json, sha256_file, write_csv, write_json
from common.provenance import read_meta, write_meta
from conftest import make_image, project_copy

SCRIPT = "<script>alert(1)</script> red blobs"
ATTRIBUTE = '"><img src=x onerror=alert(1)> vertical edges'
SUB_EVIL = "<b>bold</b> sub-concept"
BEATEN_EVIL = "<i>refined</i> guess"  # a candidate 09's refinement did not choose
CONTROL_CORR = {2: 0.6}  # planted control r by channel (others 0.1); every verified r is 0.5
HELD_OUT = {1: 12}  # planted held-out images by channel (others 200)
FAST = ["RUN=t", "MODEL=tests/fake_model.py:build", "LAYERS=relu1,conv2", "INPUT_SIZE=32",
        "TOPK=9", "GRID=3", "TILE=8", "BATCH=8", "DEVICE=cpu", "WORKERS=1", "THRESHOLD=-1",
        "ABLATE_TOP=0", "CONNECT_THRESHOLD=0"]


def image_set(folder: Path) -> Path:
    """Class 0: 10 red squares and 6 bar images (misclassified as 1); class 1: 10 bar images."""
    rng = np.random.default_rng(0)
    for label, kinds in ((0, ["red"] * 10 + ["edges"] * 6), (1, ["edges"] * 10)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        for i, kind in enumerate(kinds):
            make_image(kind, 48, rng).save(folder / str(label) / f"{kind}_{i:02d}.png")
    return folder


def make(root: Path, args: list[str], *targets: str) -> subprocess.CompletedProcess:
    """Run make in ``root`` and fail with its output when it fails."""
    result = subprocess.run(["make", "--no-print-directory", *targets, *args], cwd=root,
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"make {' '.join(targets)} failed:\n{result.stderr[-4000:]}")
    return result


def plant_descriptions(run: Path) -> None:
    """Replace two descriptions of relu1 by markup, as if 03's describer had written them: the
    file's hash in 03's meta is updated, so later stages accept it."""
    path = run / "03_descriptions.csv"
    rows = read_csv(path)
    for row in rows:
        if row["layer"] == "relu1" and row["channel"] in ("0", "1"):
            row["description"] = SCRIPT if row["channel"] == "0" else ATTRIBUTE
    write_csv(path, rows, list(rows[0]))
    meta_file = run / "03_describe.meta.json"
    meta = read_json(meta_file)
    meta["files"][path.name] = sha256_file(path)
    write_json(meta_file, meta)


def write_scores(run: Path, seed: int = 1, unverified: tuple = ()) -> None:
    """A small 09_scores.csv / 09_summary.csv in stage 09's columns, with its meta (another
    ``seed``: other DnR scores, as a new run of 09 would give; the ``unverified`` (layer,
    channel) get no verification columns, as when 09 could not verify a sentence)."""
    rows, rng = [], np.random.default_rng(seed)
    mosaics = {(r["layer"], int(r["channel"])): r["path"] for r in read_csv(run / "02_mosaics.csv")}
    channels = collections.Counter(layer for layer, _ in mosaics)
    for (layer, channel), mosaic in sorted(mosaics.items()):
        base = {"layer": layer, "channel": channel, "embedder": "fake", "matcher": "fake-matcher"}
        # The three verdicts: channel 0 beats its control on 200 images (reliably), 1 on only
        # 12 (weakly: the interval reaches 0), 2 loses to it (not better than chance).
        control = CONTROL_CORR.get(channel, 0.1)
        rows.append({**base, "subconcept": "", "selectivity": round(1 + channel * 0.5, 3),
                     "dnr_score": round(float(rng.random()), 3), "dead": int(channel == 3),
                     "clarity": round(0.9 - 0.2 * channel, 3), "polysemanticity": 0.1 * channel,
                     "redundancy": 0.2, "verify_corr": 0.5, "verify_auprc": 0.6,
                     "control_corr": control, "control_auprc": 0.3,
                     "n_held_out": HELD_OUT.get(channel, 200),
                     "n_positives": 5, "control_channel": (channel + 1) % channels[layer]})
        if (layer, channel) in unverified:
            for column in ("verify_corr", "verify_auprc", "control_corr", "control_auprc",
                           "n_held_out", "n_positives", "control_channel"):
                rows[-1][column] = ""
        if layer == "relu1" and channel == 0:
            for k in (1, 2):
                rows.append({**base, "subconcept": k, "share": 0.5,
                             "description": SUB_EVIL if k == 1 else "plain sub-concept",
                             "mosaic": mosaic, "verify_corr": 0.4})
    write_csv(run / "09_scores.csv", rows, columns(ScoreRow))
    layers = sorted({r["layer"] for r in rows})
    write_csv(run / "09_summary.csv", [{"layer": L, "neurons": 4, "dead": 1, "mean_clarity": 0.5,
                                        "matcher": "fake-matcher", "embedder": "fake"}
                                       for L in layers], columns(SummaryRow))
    # No final-layer benchmark on these layers: 09_eval.csv has its header only, as 09 writes it.
    write_csv(run / "09_eval.csv", [], ["layer", "channel", "class_name", "description", "cosine",
                                        "shuffled_cosine", "shuffled_from", "embedder"])
    # 09's candidates: relu1 #0's sentence beat a sub-concept's and a refined one (model text)
    write_csv(run / "09_candidates.csv",
              [{"layer": "relu1", "channel": 0, "subconcept": "", "iteration": i, "source": src,
                "description": text, "selection_corr": corr, "chosen": int(i == 0 and
                                                                           src == "sentence")}
               for i, src, text, corr in ((0, "sentence", SCRIPT, 0.5),
                                          (0, "subconcept", SUB_EVIL, 0.2),
                                          (1, "refined", BEATEN_EVIL, 0.3))],
              columns(CandidateRow))
    write_meta(run / "09_score.meta.json", "09_score", {},
               [run / "09_scores.csv", run / "09_summary.csv", run / "09_eval.csv",
                run / "09_candidates.csv"],
               inputs=[read_meta(run / "03_descriptions.csv")])


def fake_run(base: Path) -> tuple[Path, list[str], Path]:
    """Build the run (01-08, 09 planted: all four of its files, so that make does not run it,
    and the atlas) under ``base``; return (tree, make args, run)."""
    tree = project_copy(base / "tree")
    images = image_set(base / "images")
    args = [f"IMAGES={images}", f"DATA={base / 'data'}", *FAST]
    run = base / "data" / "t"
    make(tree, args, str(run / "03_descriptions.csv"))
    plant_descriptions(run)
    make(tree, args, str(run / "08_confusion.csv"), str(run / "06_trace.csv"))
    write_scores(run)
    make(tree, args, "atlas")
    return tree, args, run
