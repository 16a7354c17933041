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

Example:
  python 07_search.py --embeddings data/demo/04_embeddings.npz "a dog with a ball" "striped fur"
  python 07_search.py --embeddings data/demo/04_embeddings.npz --interactive   # queries on stdin
  python 07_search.py --embeddings data/demo/04_embeddings.npz --image cat.jpg --html cat.html
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from common.cli import StageError, exit_on_stage_error, setup_logging
from common.artefacts import (description_texts, read_descriptions, read_embeddings,
                              read_mosaics, read_scores)
from common.io import write_csv, write_text
from common.provenance import merge_lineage, read_meta, write_meta
from common.report import esc, html_page, html_table, img_tag, plain_text

log = logging.getLogger("neuron-atlas.07_search")

STAGE = "07_search"
DEFAULT_BASELINE = "a picture of various things"  # a description that says nothing specific
SCORINGS = ("cosine", "baseline", "neuron")  # how a text query's cosines may be ranked
DEFAULT_SCORING = "cosine"  # ranked the right neurons first most often (bench/bench_search.py)
GENERIC_QUERIES = (  # queries that name no particular concept: a neuron's usual response to a query
    "an object", "a thing", "a texture", "a pattern", "a shape", "a colour", "edges and lines",
    "a picture", "an animal", "a person", "a scene", "a building", "a vehicle", "food",
    "clothing", "a plant", "a tool", "text", "a surface", "the background")
HIT_FIELDS = ["query", "rank", "layer", "channel", "score", "cosine", "description", "mosaic"]
DESC_WIDTH = 70  # characters of a description printed on the terminal (files get it whole)


class NeuronIndex:
    """Every neuron of a run with its vectors, description and mosaic, in 04's row order."""

    def __init__(self, layers: np.ndarray, channels: np.ndarray, text: np.ndarray,
                 image: np.ndarray | None, text_model: str, image_model: str,
                 descriptions: list[str], mosaics: list[Path | None]):
        """Hold the arrays; ``text``/``image`` rows are unit vectors (zero rows: missing)."""
        self.layers = layers              # (N,) str
        self.channels = channels          # (N,) int64
        self.text = text                  # (N, Dt) float32
        self.image = image                # (N, Di) float32, or None when 04 stored none
        self.text_model = text_model
        self.image_model = image_model
        self.descriptions = descriptions
        self.mosaics = mosaics

    def select_layers(self, wanted: list[str]) -> "NeuronIndex":
        """The neurons of the ``wanted`` layers only; an unknown layer name is an error."""
        known = list(dict.fromkeys(self.layers.tolist()))
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise StageError(f"--layers: {', '.join(unknown)} not in 04_embeddings.npz; "
                             f"layers there: {', '.join(known)}")
        return self.select(np.isin(self.layers, wanted))

    def select(self, keep: np.ndarray) -> "NeuronIndex":
        """The neurons where the boolean mask ``keep`` is true."""
        rows = np.flatnonzero(keep)
        return NeuronIndex(self.layers[keep], self.channels[keep], self.text[keep],
                           None if self.image is None else self.image[keep], self.text_model,
                           self.image_model, [self.descriptions[i] for i in rows],
                           [self.mosaics[i] for i in rows])


def load_index(path: Path, descriptions_path: Path, mosaics_path: Path) -> NeuronIndex:
    """Read 04_embeddings.npz and join the description and mosaic of each neuron."""
    emb = read_embeddings(path)
    descriptions = description_texts(read_descriptions(descriptions_path, required=False))
    mosaics = {m.key: m.path for m in read_mosaics(mosaics_path, required=False)}
    keys = emb.keys()
    return NeuronIndex(layers=emb.layer, channels=emb.channel, text=emb.text, image=emb.image,
                       text_model=emb.text_model, image_model=emb.image_model,
                       descriptions=[descriptions.get(k, "") for k in keys],
                       mosaics=[mosaics.get(k) for k in keys])


def embedder_matches(embedder, stored: str) -> bool:
    """True when ``embedder`` is the model whose name (or vector-space id) 04 stored."""
    return stored in {getattr(embedder, "name", None), getattr(embedder, "space_id", None)}


def is_clip_name(name: str) -> bool:
    """True for a clip-anytorch model name (``ViT-B/32``, ``RN50x4`` …) or checkpoint file."""
    pattern = r"RN\d+(x\d+)?|ViT-[BLH]/\d+(@\d+px)?"
    return name.endswith(".pt") or re.fullmatch(pattern, name) is not None


def loader_name(stored: str, kind: str) -> str:
    """The name to give ``load_text_embedder`` / ``load_image_embedder`` to get back ``stored``.

    04 records an embedder's ``name``: a sentence-transformers id or folder for text, a CLIP model
    name for either tower, or the reference CNN's model name for images.
    """
    if stored.startswith("clip:"):
        return stored
    if is_clip_name(stored):
        return f"clip:{stored}"
    if kind == "text":
        return stored
    return "cnn"  # the reference CNN's pooled feature, whatever its recorded model name


def check_embedder(embedder, stored: str, vectors: np.ndarray, kind: str) -> None:
    """Refuse a query embedder whose space differs from the one the neurons were embedded in."""
    if not embedder_matches(embedder, stored):
        raise StageError(
            f"the {kind} embeddings in 04_embeddings.npz were made with {stored!r}, but the {kind} "
            f"embedder here is {getattr(embedder, 'name', '?')!r} (space "
            f"{getattr(embedder, 'space_id', getattr(embedder, 'space', '?'))!r}); their vectors "
            f"cannot be compared. Make that model available here, or re-run 04 with this one")
    if embedder.dim != vectors.shape[1]:
        raise StageError(f"the {kind} embedder gives {embedder.dim}-d vectors but 04 stored "
                         f"{vectors.shape[1]}-d ones; re-run 04")


class Searcher:
    """Answers queries over a ``NeuronIndex``; embedders and the baseline are prepared once.

    A warm query costs one embedding and one matrix-vector product over all neurons.
    """

    def __init__(self, index: NeuronIndex, text_embedder=None, image_embedder=None,
                 scoring: str = DEFAULT_SCORING, baseline: str = DEFAULT_BASELINE):
        """Check the embedders against the index and precompute what ``scoring`` needs.

        Scorings of a text query: ``cosine``; ``baseline``: minus the neuron's cosine with the
        ``baseline`` sentence; ``neuron``: a z-score of the cosine against the neuron's cosines
        with GENERIC_QUERIES.
        """
        if scoring not in SCORINGS:
            raise StageError(f"unknown scoring {scoring!r}: one of {', '.join(SCORINGS)}")
        self.index = index
        self.text_embedder = text_embedder
        self.image_embedder = image_embedder
        self.scoring, self.baseline = scoring, baseline
        # Neurons without a description (zero vector) would score 0 and outrank real neurons
        # with a negative normalised score, so they are left out of text search.
        self._has_text = np.linalg.norm(index.text, axis=1) > 0
        self._offset = np.zeros(len(index.layers), np.float32)
        self._scale = np.ones(len(index.layers), np.float32)
        if text_embedder is not None:
            check_embedder(text_embedder, index.text_model, index.text, "text")
            if scoring == "baseline":
                self._offset = index.text @ text_embedder.encode([baseline])[0]
            elif scoring == "neuron":
                usual = index.text @ text_embedder.encode(list(GENERIC_QUERIES)).T
                self._offset = usual.mean(axis=1)
                self._scale = np.maximum(usual.std(axis=1), 1e-3)  # a zero row stays finite
        if image_embedder is not None:
            if index.image is None:
                raise StageError("04_embeddings.npz holds no image embeddings, so an image query "
                                 "has nothing to match; re-run 04 with an image embedder")
            check_embedder(image_embedder, index.image_model, index.image, "image")

    def describe_scoring(self) -> str:
        """One line saying how text scores are made, printed above each answer."""
        return {"cosine": "score = cosine",
                "baseline": f'score = cosine − cosine of "{self.baseline}"',
                "neuron": f"score = z of the cosine against the neuron's cosines with "
                          f"{len(GENERIC_QUERIES)} generic queries"}[self.scoring]

    def search_text(self, query: str, top_k: int) -> list[dict]:
        """Top-k neurons for a text query, ranked by the chosen scoring of their cosines."""
        cosine = self.index.text @ self.text_embedder.encode([query])[0]
        score = (cosine - self._offset) / self._scale
        return self._hits(query, cosine, score, self._has_text, top_k)

    def search_image(self, image, label: str, top_k: int) -> list[dict]:
        """Top-k neurons for an example image (a PIL image), ranked by cosine."""
        q = self.image_embedder.encode([image])[0]
        cosine = self.index.image @ q
        valid = np.linalg.norm(self.index.image, axis=1) > 0
        return self._hits(label, cosine, cosine, valid, top_k)

    def _hits(self, query: str, cosine: np.ndarray, score: np.ndarray, valid: np.ndarray,
              top_k: int) -> list[dict]:
        """Rows of the ``top_k`` best ``score``s among ``valid`` neurons (ties: 04's row order)."""
        candidates = np.flatnonzero(valid)
        # a stable sort keeps 04's row order among equal scores, at the top-k cut too
        best = candidates[np.argsort(-score[candidates], kind="stable")[:top_k]]
        ix = self.index
        return [{"query": query, "rank": r + 1, "layer": str(ix.layers[i]),
                 "channel": int(ix.channels[i]), "score": round(float(score[i]), 4),
                 "cosine": round(float(cosine[i]), 4), "description": ix.descriptions[i],
                 "mosaic": "" if ix.mosaics[i] is None else str(ix.mosaics[i])}
                for r, i in enumerate(best)]


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
    parts = ["<h1>Neuron search</h1>"]
    for query, note, hits in groups:
        parts.append(f"<h2>{esc(query)}</h2>")
        if note:
            parts.append(f"<p>{esc(note)}</p>")
        rows = [{**h, "mosaic_img": img_tag(h["mosaic"] or None, f"{h['layer']} {h['channel']}",
                                            embed=False, relative_to=html_path.parent)}
                for h in hits]
        parts.append(html_table(["rank", "layer", "channel", "score", "cosine", "mosaic_img",
                                 "description"], rows, raw=["mosaic_img"],
                                numeric=["rank", "channel", "score", "cosine"]))
    return html_page("Neuron search", "\n".join(parts))


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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


@exit_on_stage_error
def main(argv=None):
    """Parse flags and answer the queries."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
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
