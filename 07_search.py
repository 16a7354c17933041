"""Stage 07 — find neurons by a text query, or by an example image, across all layers.

Reads (see ARTEFACTS.md) 04_embeddings.npz (one vector per neuron) and, shown next to each hit,
03_descriptions.csv and 02_mosaics.csv (by default beside the embeddings; optional), with metas.
Prints, per query, the top-k neurons: rank, layer, channel, score, cosine, description, mosaic.
Writes only on request: --csv FILE and --html FILE (mosaics beside the descriptions, all model text
escaped), plus a 07_search.meta.json beside them.

A text query is embedded with the text model that 04 used and compared (cosine) with the neurons'
text embeddings; hits are ranked by that cosine. --scoring baseline subtracts the cosine of a
content-free sentence (SemanticLens's empty-template baseline) and --scoring neuron z-scores it
against the neuron's cosines with generic queries; measured on a labelled case and on the demo
(bench/bench_search.py, figures in README), plain cosine ranked the right neurons first most
often, so it is the default. An image query is compared with the neurons' image
embeddings and is refused when the image embedder available here is not the one 04 used.
The search itself lives in common/search.py, shared with the atlas's live search (10_atlas.py
serve).

Example:
  python 07_search.py --embeddings data/demo/04_embeddings.npz "a dog with a ball" "striped fur"
  python 07_search.py --embeddings data/demo/04_embeddings.npz --interactive   # queries on stdin
  python 07_search.py --embeddings data/demo/04_embeddings.npz --image cat.jpg --html cat.html
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from common.cli import StageError, exit_on_stage_error, stage_parser, start_stage
from common.artefacts import read_scores
from common.io import plain_text, write_csv, write_text
from common.provenance import merge_lineage, read_meta, write_meta
from common import render as doc
from common.search import (DEFAULT_BASELINE, DEFAULT_SCORING, SCORINGS, Searcher, load_index,
                           loader_name)

log = logging.getLogger("neuron-atlas.07_search")

STAGE = "07_search"
HIT_FIELDS = ["query", "rank", "layer", "channel", "score", "cosine", "description", "mosaic"]
DESC_WIDTH = 70  # characters of a description printed on the terminal (files get it whole)


def format_hits(query: str, hits: list[dict], note: str = "") -> str:
    """A plain-text block for the terminal: a header line, then one aligned line per hit. Text
    from files (model descriptions, paths) is stripped of control characters, so that no escape
    code it may hold reaches the terminal."""
    lines = [f"== {plain_text(query)}" + (f"   ({plain_text(note)})" if note else "")]
    if not hits:
        lines.append("   (no neuron to match)")
        return "\n".join(lines)
    width = max(5, *(len(plain_text(h["layer"])) for h in hits))
    lines.append(f"{'rank':>4}  {'layer':<{width}}  {'chan':>5}  {'score':>7}  {'cosine':>7}  "
                 f"{'description':<{DESC_WIDTH}}  mosaic")
    for h in hits:
        desc = plain_text(h["description"]) or "(no description)"
        if len(desc) > DESC_WIDTH:
            desc = desc[:DESC_WIDTH - 1] + "…"
        lines.append(f"{h['rank']:>4}  {plain_text(h['layer']):<{width}}  {h['channel']:>5}  "
                     f"{h['score']:>7.3f}  {h['cosine']:>7.3f}  {desc:<{DESC_WIDTH}}  "
                     f"{plain_text(h['mosaic'] or '-')}")
    return "\n".join(lines)


def render_html(groups: list[tuple[str, str, list[dict]]], html_path: Path) -> str:
    """An HTML page with one table per query; mosaics linked relative to the page's folder."""
    blocks = [doc.heading("Neuron search", 1)]
    for query, note, hits in groups:
        blocks.append(doc.heading(query))
        if note:
            blocks.append(doc.paragraph(note))
        rows = [{**h, "score": doc.fmt_number(h["score"]), "cosine": doc.fmt_number(h["cosine"]),
                 "mosaic": h["mosaic"] or None} for h in hits]
        blocks.append(doc.table(["rank", "layer", "channel", "score", "cosine", "mosaic",
                                 "description"], rows, image="mosaic", embed=False, thumb_px=200,
                                numeric=["rank", "channel", "score", "cosine"]))
    return doc.html_page("Neuron search", blocks, html_path.parent)


def input_metas(embeddings: Path, descriptions: Path, mosaics: Path) -> list[dict]:
    """Metas of the artefacts read (04 required; 02 and 03 when their files exist)."""
    return [read_meta(embeddings)] + [read_meta(p) for p in (descriptions, mosaics) if p.exists()]


def run(embeddings: Path, queries: list[str], images: list[str] = (), interactive: bool = False,
        top_k: int = 10, layers: list[str] | None = None, scoring: str = DEFAULT_SCORING,
        baseline: str = DEFAULT_BASELINE,
        csv_path: Path | None = None, html_path: Path | None = None, text_embedder=None,
        image_embedder=None, device: str = "auto", stdin: TextIO | None = None,
        stdout: TextIO | None = None, descriptions: Path | None = None,
        mosaics: Path | None = None, min_score: float | None = None,
        scores: Path | None = None, args: dict | None = None) -> list[dict]:
    """Answer the text ``queries``, the example ``images`` and, if ``interactive``, every line of
    ``stdin``; print each answer to ``stdout`` and return all hit rows.

    ``descriptions``, ``mosaics`` and ``scores`` default to the contract's file names beside
    ``embeddings``. With ``min_score`` only neurons whose description was verified (09's
    ``verify_corr``) at least that well are searched. Embedders are loaded here only when not injected (tests inject fakes).
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    embeddings = Path(embeddings)
    descriptions = Path(descriptions or embeddings.parent / "03_descriptions.csv")
    mosaics = Path(mosaics or embeddings.parent / "02_mosaics.csv")
    metas = input_metas(embeddings, descriptions, mosaics)
    merge_lineage(metas)  # refuse inputs that come from different runs
    index = load_index(embeddings, descriptions, mosaics)
    if layers:
        index = index.select_layers(layers)
    if min_score is not None:
        scores = Path(scores or embeddings.parent / "09_scores.csv")
        if not scores.exists():
            raise StageError(f"--min-score needs {scores} (stage 09: make all); it is missing")
        metas.append(read_meta(scores))
        merge_lineage(metas)
        verified = read_scores(scores)
        corr = [verified.get((layer, int(ch)), {}).get("verify_corr")
                for layer, ch in zip(index.layers.tolist(), index.channels.tolist())]
        keep = np.array([c is not None and c >= min_score for c in corr], dtype=bool)
        log.info("--min-score %.2f: %d of %d neurons have a verified description that good",
                 min_score, int(keep.sum()), len(keep))
        index = index.select(keep)
    wants_text = bool(queries) or interactive
    if wants_text and text_embedder is None:
        from common.embedders import load_text_embedder
        text_embedder = load_text_embedder(loader_name(index.text_model, "text"), device=device)
    if images and image_embedder is None:
        from common.embedders import load_image_embedder
        image_embedder = load_image_embedder(loader_name(index.image_model, "image"), device=device)
    searcher = Searcher(index, text_embedder if wants_text else None,
                        image_embedder if images else None, scoring, baseline)
    note = searcher.describe_scoring()
    groups: list[tuple[str, str, list[dict]]] = []

    def answer(label: str, hits: list[dict], why: str) -> None:
        """Print one query's hits at once (an interactive user sees them immediately)."""
        groups.append((label, why, hits))
        print(format_hits(label, hits, why), file=stdout, flush=True)

    for query in queries:
        answer(query, searcher.search_text(query, top_k), note)
    for image_path in images:
        from common.images import BadImage, load_rgb
        try:
            image, _ = load_rgb(image_path)
        except BadImage as err:
            raise StageError(f"cannot read query image {image_path}: {err.reason}") from err
        label = f"image: {image_path}"
        answer(label, searcher.search_image(image, label, top_k), "score = cosine of image vectors")
    if interactive:
        if stdin.isatty():
            print("type a query per line; Ctrl-D ends", file=sys.stderr)
        for line in stdin:
            query = line.strip()
            if query:
                answer(query, searcher.search_text(query, top_k), note)

    rows = [h for _, _, hits in groups for h in hits]
    outputs = []
    if csv_path is not None:
        write_csv(csv_path, rows, HIT_FIELDS)
        outputs.append(Path(csv_path))
    if html_path is not None:
        write_text(html_path, render_html(groups, Path(html_path)))
        outputs.append(Path(html_path))
    for folder in sorted({p.parent for p in outputs}):
        write_meta(folder / f"{STAGE}.meta.json", STAGE, args or {},
                   outputs=[p for p in outputs if p.parent == folder], inputs=metas,
                   queries=[g[0] for g in groups], text_model=index.text_model,
                   image_model=index.image_model, scoring=scoring,
                   baseline=baseline if scoring == "baseline" else None)
    return rows


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of stage 07."""
    p = stage_parser(__doc__.split("\n")[0])
    p.add_argument("queries", nargs="*", help="text queries, e.g. \"a dog with a ball\"")
    p.add_argument("--embeddings", required=True, type=Path, help="04_embeddings.npz of the run")
    p.add_argument("--descriptions", type=Path, default=None,
                   help="03_descriptions.csv (None: the one beside --embeddings)")
    p.add_argument("--mosaics", type=Path, default=None,
                   help="02_mosaics.csv (None: the one beside --embeddings)")
    p.add_argument("--interactive", action="store_true",
                   help="after the given queries, read one query per line from stdin until EOF")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an example image as the query (repeatable)")
    p.add_argument("--top-k", type=int, default=10, help="neurons shown per query")
    p.add_argument("--layers", default="", help="comma-separated layers to search (empty: all)")
    p.add_argument("--scoring", choices=SCORINGS, default=DEFAULT_SCORING,
                   help="ranking of a text query: cosine; baseline (minus the neuron's cosine "
                        "with --baseline); neuron (z-score against the neuron's cosines with "
                        "generic queries). README: what each ranked first, measured")
    p.add_argument("--baseline", default=DEFAULT_BASELINE,
                   help="--scoring baseline: the content-free text whose cosine is subtracted")
    p.add_argument("--min-score", type=float, default=None,
                   help="search only neurons whose description 09 verified at least this well "
                        "(verify_corr, the correlation of the sentence with the neuron on held-out "
                        "images)")
    p.add_argument("--scores", type=Path, default=None,
                   help="09_scores.csv (None: the one beside --embeddings)")
    p.add_argument("--csv", type=Path, default=None, help="also write all hits to this CSV")
    p.add_argument("--html", type=Path, default=None,
                   help="also write an HTML page with mosaics beside the descriptions")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda …")
    return p


@exit_on_stage_error
def main(argv=None):
    """Parse flags and answer the queries."""
    parser = build_parser()
    args = start_stage(parser, argv)
    if not (args.queries or args.image or args.interactive):
        parser.error("give at least one query, --image PATH or --interactive")
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    layers = [n.strip() for n in args.layers.split(",") if n.strip()]
    run(args.embeddings, args.queries, args.image, interactive=args.interactive,
        top_k=args.top_k, layers=layers, scoring=args.scoring, baseline=args.baseline,
        csv_path=args.csv, html_path=args.html, device=args.device,
        descriptions=args.descriptions, mosaics=args.mosaics, min_score=args.min_score,
        scores=args.scores, args=vars(args))


if __name__ == "__main__":
    main()
