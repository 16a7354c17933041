"""Stage 07 — find neurons by a text query, or by an example image, across all layers.

Reads (see ARTEFACTS.md), in the run folder (--run), 04_embeddings.npz (one vector per neuron)
and, shown next to each hit, 03_descriptions.csv and 02_mosaics.csv (optional), with metas.
Prints, per query, the top-k neurons: rank, layer, channel, score, cosine, description, mosaic.
Writes only on request: --csv FILE and --html FILE (mosaics beside the descriptions, all model text
escaped), plus a 07_search.meta.json beside them.

A text query is embedded with the text model that 04 used and compared (cosine) with the neurons'
text embeddings; hits are ranked by that cosine. --scoring baseline subtracts the cosine of a
content-free sentence (SemanticLens's empty-template baseline) and --scoring neuron z-scores it
against the neuron's cosines with generic queries; measured on a labelled case and on the demo
(bench/bench_search.py, figures in bench/RESULTS.md), plain cosine ranked the right neurons first
most often, so it is the default. An image query is compared with the neurons' image
embeddings and is refused when the image embedder available here is not the one 04 used.
The search itself lives in common/search.py. With --serve (make serve), 07 serves the run's atlas
over HTTP (Python's standard library: one local user, a few read-only JSON endpoints and static
files need no framework) and answers its search page's queries: text, and an uploaded image.

Example:
  python 07_search.py --run data/demo "a dog with a ball" "striped fur"
  python 07_search.py --run data/demo --interactive                        # queries on stdin
  python 07_search.py --run data/demo --image cat.jpg --html cat.html
  python 07_search.py --run data/demo --serve --port 8765
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
import io
import json
import logging
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TextIO
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np

from common.artefacts import Run, read_scores
from common.cli import (StageError, add_run, add_settings, comma_list, exit_on_stage_error, setting,
                        settings_from, stage_parser, start_stage)
from common.io import plain_text, write_csv, write_text
from common.provenance import merge_lineage, read_meta, write_meta
from common import render as doc
from common.search import (DEFAULT_BASELINE, DEFAULT_SCORING, SCORINGS, WEAK_BELOW, Searcher,
                           load_index, loader_name)

log = logging.getLogger("neuron-atlas.07_search")

STAGE = "07_search"
HIT_FIELDS = ["query", "rank", "layer", "channel", "score", "cosine", "description", "mosaic"]
DESC_WIDTH = 70  # characters of a description printed on the terminal (files get it whole)
TOP_K, SERVE_TOP_K = 10, 24  # neurons per query: printed, and answered to the atlas's page
MAX_UPLOAD = 20 << 20  # largest image accepted by the live image search (bytes)


@dataclass(frozen=True)
class Settings:
    """Stage 07's settings: one flag each (``--top-k`` …), defaults written here only."""

    top_k: int | None = setting(
        None, f"neurons shown per query (None: {TOP_K}, {SERVE_TOP_K} with --serve)")
    layers: str = setting("", "comma-separated layers to search (empty: all)")
    scoring: str = setting(
        DEFAULT_SCORING, "ranking of a text query: cosine; baseline (minus the neuron's cosine "
        "with --baseline); neuron (z-score against the neuron's cosines with generic queries). "
        "docs/search.md: what each ranked first, measured", make="SCORING", choices=SCORINGS)
    baseline: str = setting(DEFAULT_BASELINE, "--scoring baseline: the content-free text whose "
                            "cosine is subtracted")
    weak_below: float = setting(
        WEAK_BELOW, "a text hit whose cosine is below this is a weak match, and a query whose "
        "best hit is weak has no good match (measured for all-MiniLM-L6-v2: docs/search.md)",
        make="WEAK_BELOW")
    min_score: float | None = setting(
        None, "search only neurons whose description 09 verified at least this well "
        "(verify_corr, the correlation of the sentence with the neuron on held-out images)",
        make="MIN_SCORE")
    device: str = setting("auto", "auto (cuda if present), cpu, cuda …", make="DEVICE")
    host: str = setting("127.0.0.1", "--serve: address to listen on (local only)", make="HOST")
    port: int = setting(8765, "--serve: port (0: any free port)", make="PORT")


def format_hits(query: str, hits: list[dict], note: str = "") -> str:
    """A plain-text block for the terminal: a header line, then one aligned line per hit. Text
    from files (model descriptions, paths) is stripped of control characters, so that no escape
    code it may hold reaches the terminal."""
    lines = [f"== {plain_text(query)}" + (f"   ({plain_text(note)})" if note else "")]
    if not hits:
        lines.append("   (no neuron to match)")
        return "\n".join(lines)
    if hits[0].get("weak"):
        lines.append(f"   no good match: the best cosine, {hits[0]['cosine']:.2f}, is below the "
                     f"weak-match threshold; the closest neurons are listed all the same")
    width = max(5, *(len(plain_text(h["layer"])) for h in hits))
    lines.append(f"{'rank':>4}  {'layer':<{width}}  {'chan':>5}  {'score':>7}  {'cosine':>7}  "
                 f"{'description':<{DESC_WIDTH}}  mosaic")
    for h, before in zip(hits, [None, *hits]):
        if h.get("weak") and before is not None and not before.get("weak"):
            lines.append("   -- weak matches (cosine below the threshold) --")
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


def run(run: Run, queries: list[str], settings: Settings = Settings(), images: list[str] = (),
        interactive: bool = False, csv_path: Path | None = None, html_path: Path | None = None,
        text_embedder=None, image_embedder=None, stdin: TextIO | None = None,
        stdout: TextIO | None = None, args: dict | None = None) -> list[dict]:
    """Answer the text ``queries``, the example ``images`` and, if ``interactive``, every line of
    ``stdin`` over the neurons of ``run``; print each answer to ``stdout`` and return all hit rows.

    With ``settings.min_score`` only neurons whose description was verified (09's
    ``verify_corr``) at least that well are searched. Embedders are loaded here only when not
    injected (tests inject fakes).
    """
    top_k, scoring, baseline = settings.top_k or TOP_K, settings.scoring, settings.baseline
    layers = comma_list(settings.layers)
    min_score, device = settings.min_score, settings.device
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    embeddings, descriptions, mosaics = run.embeddings, run.descriptions, run.mosaics
    metas = input_metas(embeddings, descriptions, mosaics)
    merge_lineage(metas)  # refuse inputs that come from different runs
    index = load_index(embeddings, descriptions, mosaics)
    if layers:
        index = index.select_layers(layers)
    if min_score is not None:
        scores = run.scores
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
                        image_embedder if images else None, scoring, baseline,
                        settings.weak_below)
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


# ----------------------------------------------------------------------------------------------
# Serving: the run's atlas with live search (make serve)


class SearchService:
    """The search over the run's neurons, with the embedders loaded once; thread-safe."""

    def __init__(self, run_dir: Path, top_k: int, device: str = "auto", text_embedder=None,
                 image_embedder=None, weak_below: float = WEAK_BELOW):
        """Load the index and the embedders; image search is off (with a reason) if impossible."""
        from common.search import Searcher, load_index, loader_name
        files = Run(run_dir)
        embeddings = files.embeddings
        index = load_index(embeddings, files.descriptions, files.mosaics)
        if text_embedder is None:
            from common.embedders import load_text_embedder
            text_embedder = load_text_embedder(loader_name(index.text_model, "text"), device=device)
        self.image_reason = ""
        if image_embedder is None and index.image is not None:
            from common.embedders import load_image_embedder
            try:
                image_embedder = load_image_embedder(loader_name(index.image_model, "image"),
                                                     device=device)
            except (StageError, OSError) as err:
                self.image_reason = f"image search unavailable: {err}"
        try:
            self.searcher = Searcher(index, text_embedder, image_embedder, weak_below=weak_below)
        except StageError as err:  # the image embedder here is not 04's: text search only
            self.image_reason = str(err)
            self.searcher = Searcher(index, text_embedder, None, weak_below=weak_below)
        self.top_k = top_k
        self.lock = threading.Lock()

    def status(self) -> dict:
        """What the page may offer."""
        return {"text": True, "image": self.searcher.image_embedder is not None,
                "image_reason": self.image_reason, "k": self.top_k,
                "weak_below": self.searcher.weak_below,
                "layers": list(dict.fromkeys(self.searcher.index.layers.tolist()))}

    def text(self, query: str, k: int, layers: list[str] | None = None) -> dict:
        """Hits for a text query (among the neurons of ``layers`` when given); ``weak`` marks a
        hit below the weak-match threshold, ``good`` says whether the best hit is above it."""
        with self.lock:
            hits = self.searcher.search_text(query, k, layers)
        return {"query": query, "hits": hits, "note": self.searcher.describe_scoring(),
                "weak_below": self.searcher.weak_below,
                "good": bool(hits) and not hits[0]["weak"]}

    def image(self, data: bytes, k: int, layers: list[str] | None = None) -> dict:
        """Hits for an uploaded image (bytes of any format Pillow reads), among the neurons of
        ``layers`` when given."""
        from PIL import Image, UnidentifiedImageError
        if self.searcher.image_embedder is None:
            return {"error": self.image_reason or "no image embeddings in this run"}
        try:
            with Image.open(io.BytesIO(data)) as img:
                picture = img.convert("RGB")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            return {"error": f"cannot read the uploaded image: {err}"}
        with self.lock:
            hits = self.searcher.search_image(picture, "uploaded image", k, layers)
        return {"query": "uploaded image", "hits": hits, "note": "score = cosine of image vectors"}


def make_handler(root: Path, atlas_url: str, service: SearchService):
    """A request handler class serving the files under ``root``, with the atlas at the URL path
    ``atlas_url`` (``/`` redirects there) and the search endpoints under ``atlas_url + "api/"``."""

    class Handler(SimpleHTTPRequestHandler):
        """Static files; GET api/status, GET api/search, POST api/search-image (atlas-relative)."""

        def __init__(self, *a, **kw):
            """Serve files from ``root`` only."""
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, fmt, *args):
            """Requests go to the debug log, not to stderr line by line."""
            log.debug("%s " + fmt, self.address_string(), *args)

        def send_json(self, obj, status: int = 200) -> None:
            """Answer with a JSON body."""
            body = json.dumps(obj).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def top_k(self, query: dict) -> int:
            """The k asked for, within 1 … 200."""
            try:
                return max(1, min(200, int(query.get("k", [service.top_k])[0])))
            except ValueError:
                return service.top_k

        def layers(self, query: dict) -> list[str] | None:
            """The layers asked for (``layer=a,b`` or repeated), None for all."""
            return [name for value in query.get("layer", []) for name in comma_list(value)] or None

        def do_GET(self):
            """API calls, else a file of the atlas."""
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if url.path == "/" and atlas_url != "/":
                self.send_response(302)
                self.send_header("Location", atlas_url)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if url.path == atlas_url + "api/status":
                return self.send_json(service.status())
            if url.path == atlas_url + "api/search":
                text = query.get("q", [""])[0].strip()
                if not text:
                    return self.send_json({"error": "empty query"}, 400)
                return self.send_json(service.text(text, self.top_k(query), self.layers(query)))
            return super().do_GET()

        def do_POST(self):
            """Image search: the request body is the image file."""
            url = urlsplit(self.path)
            if url.path != atlas_url + "api/search-image":
                return self.send_json({"error": "unknown endpoint"}, 404)
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_UPLOAD:
                return self.send_json({"error": f"send an image of 1 byte to {MAX_UPLOAD >> 20} "
                                                f"MB as the request body"}, 400)
            query = parse_qs(url.query)
            answer = service.image(self.rfile.read(length), self.top_k(query), self.layers(query))
            return self.send_json(answer, 400 if "error" in answer else 200)

    return Handler


def serve(run_dir: Path, atlas_dir: Path | None = None, host: str = "127.0.0.1", port: int = 8765,
          top_k: int = 24, device: str = "auto", text_embedder=None, image_embedder=None,
          started=None, weak_below: float = WEAK_BELOW) -> None:
    """Serve the atlas and its live search until interrupted: the folder holding the run folder
    is served (so that the atlas's links to compared runs' atlases work),
    the atlas at ``/<run>/atlas/``, where ``/`` redirects.

    ``started`` (tests) is called with the server once it listens; port 0 picks a free port, and
    the address actually used is logged and printed to stdout.
    """
    run_dir = Path(run_dir)
    atlas_dir = Path(atlas_dir or run_dir / "atlas")
    if not (atlas_dir / "index.html").exists():
        raise StageError(f"{atlas_dir / 'index.html'} not found: build the atlas first (make atlas)")
    service = SearchService(run_dir, top_k, device, text_embedder, image_embedder, weak_below)
    # The atlas links other runs' atlases (compared runs) by relative paths, so the folder
    # holding the runs is served, with the atlas under its own path; an atlas kept elsewhere
    # (--out) is served alone.
    root = run_dir.resolve().parent
    atlas = atlas_dir.resolve()
    if not atlas.is_relative_to(root):
        root = atlas
    atlas_url = "/" + "".join(f"{quote(part)}/" for part in atlas.relative_to(root).parts)
    server = ThreadingHTTPServer((host, port), make_handler(root, atlas_url, service))
    address = f"http://{host}:{server.server_address[1]}{atlas_url}"
    print(f"serving the atlas at {address}  (Ctrl-C stops)", flush=True)
    log.info("serving %s at %s; %s", atlas_dir, address,
             "image search on" if service.status()["image"] else service.image_reason or
             "image search off")
    if started is not None:
        started(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.server_close()



def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of stage 07: the queries, ``--run`` and the fields of ``Settings``."""
    p = stage_parser(__doc__.split("\n")[0])
    p.add_argument("queries", nargs="*", help="text queries, e.g. \"a dog with a ball\"")
    add_run(p, "04_embeddings.npz, 03_descriptions.csv, 02_mosaics.csv (09_scores.csv with "
            "--min-score)", "nothing unless --csv / --html ask")
    p.add_argument("--interactive", action="store_true",
                   help="after the given queries, read one query per line from stdin until EOF")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an example image as the query (repeatable)")
    p.add_argument("--csv", type=Path, default=None, help="also write all hits to this CSV")
    p.add_argument("--html", type=Path, default=None,
                   help="also write an HTML page with mosaics beside the descriptions")
    p.add_argument("--serve", action="store_true",
                   help="serve the run's atlas over HTTP and answer its search page's queries "
                        "(text and an uploaded image), until Ctrl-C")
    p.add_argument("--atlas", type=Path, default=None,
                   help="--serve: the atlas folder (None: <run>/atlas)")
    add_settings(p, Settings)
    return p


@exit_on_stage_error
def main(argv=None):
    """Parse flags and answer the queries."""
    parser = build_parser()
    args = start_stage(parser, argv)
    settings = settings_from(Settings, args)
    if settings.top_k is not None and settings.top_k < 1:
        parser.error("--top-k must be at least 1")
    if args.serve:
        serve(Run(args.run).folder, args.atlas, settings.host, settings.port,
              settings.top_k or SERVE_TOP_K, settings.device, weak_below=settings.weak_below)
        return
    if not (args.queries or args.image or args.interactive):
        parser.error("give at least one query, --image PATH, --interactive or --serve")
    run(Run(args.run), args.queries, settings, args.image, interactive=args.interactive,
        csv_path=args.csv, html_path=args.html, args=vars(args))


if __name__ == "__main__":
    main()
