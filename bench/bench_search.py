"""Measure how 07_search's scorings rank the right neurons, on a labelled case and on runs.

Labelled case: the neurons of tests/test_search.py's LABELLED (vague edge neurons, textures and
objects, one described in generic words), each concept queried by name; printed: the rank of its
neuron (1 = first) and the mean reciprocal rank. Demo (when `make all` has built data/demo): a
neuron is right for a class when at least half of its top 20 images carry that class's label;
printed per query: precision of the first 10 hits and average precision over all neurons.
Another run (a user's model): --query "text=label" (repeatable) names each query and the label
of 01_images.csv its right neurons' top images carry. Scorings: 07's three, and `baseline` with
the empty text as its sentence (SemanticLens's Eq. 4 as written; 07's --baseline "").
Weak-match threshold (demo): the best cosine of queries for things the demo's neurons show
(MATCHING) and for things the demo lacks (MISSING), and how many of each fall on the wrong side
of common/search.py's WEAK_BELOW and of a few other thresholds.
The shipped sentence embedder (all-MiniLM-L6-v2) embeds queries and descriptions.

  python bench/bench_search.py [--run data/demo]
  python bench/bench_search.py --run data/grey --query "pin stripe=Pin_Stripe" …
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the labelled case lives beside the test that uses it

import numpy as np  # noqa: E402

from common.artefacts import read_activations, read_images  # noqa: E402
from common.embedders import load_text_embedder  # noqa: E402
from tools.stages import load_stage  # noqa: E402
from test_search import labelled_ranks  # noqa: E402

DEMO_QUERIES = {"cat": "n02123045", "military uniform": "n03763968", "a soldier": "n03763968",
                "palace": "n03877845", "espresso": "n07920052", "coffee": "n07920052"}
TOP_IMAGES = 20  # top images of a neuron whose labels decide whether it is right for a class
MATCHING = ("a cat", "tabby cat fur", "espresso", "a cup of coffee", "military uniform",
            "a church bell tower", "a palace", "a tripod", "a bobsled", "an academic gown",
            "a petri dish", "a suit and tie", "orange texture", "black and gray texture",
            "vertical edges", "diagonal lines", "red colour", "food", "a missile", "a stone wall",
            "a drilling platform", "vehicles", "a bow tie", "a window shade")
MISSING = ("a shoe", "a violin", "a snowy mountain", "a giraffe", "an airplane wing", "a guitar",
           "a tennis racket", "a bicycle wheel", "a pineapple", "handwritten digits",
           "a chess board", "a zebra", "a microscope slide of blood cells", "a football",
           "an umbrella", "a toothbrush", "a sunset over the sea", "a horse", "a laptop",
           "a wedding dress", "a spider web", "a lighthouse", "a clock face")


def threshold_figures(search, run: Path, embedder) -> None:
    """Print the best cosine of each MATCHING and MISSING query on the demo, and the queries on
    the wrong side of the weak-match threshold (and of its neighbours)."""
    from common.search import WEAK_BELOW
    index = search.load_index(run / "04_embeddings.npz", run / "03_descriptions.csv",
                              run / "02_mosaics.csv")
    searcher = search.Searcher(index, embedder)
    best = {q: searcher.search_text(q, 1)[0] for q in MATCHING + MISSING}
    for name, queries in (("matching", MATCHING), ("missing", MISSING)):
        values = [best[q]["cosine"] for q in queries]
        print(f"{name}: best cosine {min(values):.2f} … {max(values):.2f} (median "
              f"{np.median(values):.2f}); " + ", ".join(f"{q} {best[q]['cosine']:.2f}"
                                                     for q in queries))
    for threshold in sorted({0.3, 0.35, WEAK_BELOW, 0.45, 0.5}):
        missed = [q for q in MATCHING if best[q]["cosine"] < threshold]
        passed = [q for q in MISSING if best[q]["cosine"] >= threshold]
        print(f"threshold {threshold:.2f}{' (WEAK_BELOW)' if threshold == WEAK_BELOW else ''}: "
              f"{len(missed)} of {len(MATCHING)} matching queries called weak {missed}, "
              f"{len(passed)} of {len(MISSING)} missing ones called good {passed}")


def demo_figures(search, run: Path, embedder, scoring: str, baseline: str | None = None,
                 queries: dict[str, str] = DEMO_QUERIES) -> dict[str, tuple[float, float]]:
    """Per query (text → the label its right neurons' top images carry): (precision at 10,
    average precision) of ``scoring`` (with ``baseline`` as the baseline sentence when given)."""
    index = search.load_index(run / "04_embeddings.npz", run / "03_descriptions.csv",
                              run / "02_mosaics.csv")
    labels = np.array([r.label for r in read_images(run / "01_images.csv")])
    _, _, tops = read_activations(run / "01_activations.npz", layers=set(index.layers.tolist()))
    extra = {} if baseline is None else {"baseline": baseline}
    searcher = search.Searcher(index, embedder, scoring=scoring, **extra)
    row_of = {key: i for i, key in enumerate(zip(index.layers.tolist(), index.channels.tolist()))}
    out = {}
    for query, wnid in queries.items():
        right = np.array([np.mean(labels[tops[layer].image_ids[channel, :TOP_IMAGES]] == wnid)
                          >= 0.5 for layer, channel in row_of])
        hits = searcher.search_text(query, len(row_of))
        hit_right = right[[row_of[(h["layer"], h["channel"])] for h in hits]]
        precision = np.cumsum(hit_right) / np.arange(1, len(hit_right) + 1)
        out[query] = (hit_right[:10].mean(), (precision * hit_right).sum() / hit_right.sum())
    return out


def main(argv=None) -> None:
    """Print the figures of every scoring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "data" / "demo", help="a demo run")
    parser.add_argument("--query", action="append", default=[], metavar="TEXT=LABEL",
                        help="a query and the 01_images.csv label of its right neurons (default: "
                             "the demo's)")
    args = parser.parse_args(argv)
    queries = dict(q.rsplit("=", 1) for q in args.query) or DEMO_QUERIES
    search = load_stage("07_search")
    embedder = load_text_embedder(device="cpu")
    for scoring, baseline in [(s, None) for s in search.SCORINGS] + [("baseline", "")]:
        name = f"{scoring} ''" if baseline == "" else scoring
        extra = {} if baseline is None else {"baseline": baseline}
        ranks = labelled_ranks(scoring, embedder, **extra)
        mrr = np.mean([1 / r for r in ranks.values()])
        print(f"{name:11s} labelled case: MRR {mrr:.3f}, ranks "
              + ", ".join(f"{c} {r}" for c, r in ranks.items()))
        if (args.run / "04_embeddings.npz").exists():
            figures = demo_figures(search, args.run, embedder, scoring, baseline, queries)
            print(f"{name:11s} {args.run.name}: mean P@10 "
                  f"{np.mean([p for p, _ in figures.values()]):.3f}, mean AP "
                  f"{np.mean([a for _, a in figures.values()]):.3f}; "
                  + ", ".join(f"{q} {p:.1f}/{a:.2f}" for q, (p, a) in figures.items()))

    if (args.run / "04_embeddings.npz").exists() and queries is DEMO_QUERIES:
        threshold_figures(search, args.run, embedder)


if __name__ == "__main__":
    main()
