"""Stage 06: trace concepts through the layers, linking each cluster to its closest in the next layer.

Reads, in the run folder (--run)
    05_clusters.csv       which neurons form which cluster (for cluster sizes), per layer and kind
    05_keywords.csv       the top TF-IDF terms of every cluster
    01_activations.npz    optional, only its ``layers`` array: the model's layer order (else the
                          order of 05_clusters.csv, which 05 wrote in that order)
Writes, in the run folder
    06_trace.csv          source_layer, source_cluster, source_keywords, target_layer,
                          target_cluster, target_keywords, similarity
    06_sankey.html        interactive Sankey diagram, plotly.js inlined (opens offline)
    06_sankey.png         the same diagram drawn with matplotlib
    06_trace.meta.json

Each cluster is represented by the text embedding of its top keywords ("yellow, lemon, fruit").
Every cluster of layer L is linked to the most similar cluster of layer L+1 (cosine); links below
--threshold are dropped. With --follow TEXT the path of clusters, one per layer, that best keeps
to that concept is printed and highlighted: it maximises the summed similarity of each cluster to
the query plus the summed similarity of consecutive clusters (dynamic programming over layers).

Example:
    python 06_trace.py --run data/demo --follow yellow
"""
import argparse
import collections
import html
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.artefacts import (Run, TraceLink, columns, order_layers, read_clusters, read_keywords,
                              read_layer_order)
from common.cli import (StageError, add_run, add_settings, exit_on_stage_error, setting,
                        settings_from, stage_parser, start_stage)
from common.embedders import l2_normalise
from common.io import atomic_path, sweep_temporaries, write_csv, write_text
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta

log = logging.getLogger("neuron-atlas.06_trace")


@dataclass(frozen=True)
class Settings:
    """Stage 06's settings: one flag each (``--threshold`` …), defaults written here only."""

    kind: str = setting("fused", "which clustering of 05 to trace", make="TRACE_KIND",
                        choices=("fused", "text"))
    n_keywords: int = setting(5, "keywords that represent a cluster")
    threshold: float = setting(0.5, "smallest cosine kept as a link", make="THRESHOLD")
    follow: str | None = setting(None, "a concept (free text) whose path is highlighted",
                                 make="FOLLOW")
    text_embedder: str | None = setting(
        None, "text embedder for keywords, as named to common.embedders (omitted: its offline "
        "default, all-MiniLM-L6-v2)")
    device: str = setting("auto", "auto, cpu or cuda", make="DEVICE")

LABEL_TERMS = 3  # keywords shown in a node label (hover shows all --n-keywords)
LABEL_FONT_PX = 12  # label text size of the HTML Sankey
LABEL_CHAR_PX = 7.5  # widest average character of that font, so that widths are not underestimated
COLUMN_PAD_PX = 40  # space between a label and the next column's node
MARGIN_PX = 40  # left and right margin of the HTML Sankey
PNG_LABEL_CHARS = 38  # longer node labels are cut in the PNG
PNG_FONT_PT = 9  # label size in the PNG: readable at its own size (110 dpi)
PNG_GAP_IN = PNG_LABEL_CHARS * PNG_FONT_PT * 0.62 / 72 + 0.5  # column gap (in) that holds a label
LINK_GREY = "rgba(140, 140, 140, 0.35)"  # ordinary links
PATH_RED = "rgba(214, 39, 40, 0.85)"  # nodes and links of the --follow path
NODE_BLUE = "rgba(31, 119, 180, 0.9)"  # ordinary nodes


@dataclass
class Cluster:
    """One cluster of one layer: its id, number of neurons and ranked keywords."""
    layer: str
    cluster: int
    size: int
    keywords: list[str]

    @property
    def key(self) -> tuple[str, int]:
        """(layer, cluster): the cluster's identity."""
        return self.layer, self.cluster

    def text(self, n: int) -> str:
        """The first ``n`` keywords joined by commas: what is embedded and shown."""
        return ", ".join(self.keywords[:n])


@dataclass
class Link:
    """A kept best match between a cluster and a cluster of the next layer."""
    source: Cluster
    target: Cluster
    similarity: float


def load_clusters(clusters_path, keywords_path, kind: str,
                  model_order: list[str]) -> dict[str, list[Cluster]]:
    """Clusters of the given kind per layer, layers in model order, clusters by id.

    Layers unknown to ``model_order`` keep their order of first appearance in 05_clusters.csv,
    after the known ones.
    """
    rows = [r for r in read_clusters(clusters_path) if r.kind == kind]
    if not rows:
        raise StageError(f"{clusters_path} has no rows of kind {kind!r}; use --kind text or fused")
    sizes = collections.Counter((r.layer, r.cluster) for r in rows)
    terms: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for r in read_keywords(keywords_path):
        if r.kind == kind and r.cluster is not None:
            terms.setdefault((r.layer, r.cluster), []).append((r.rank, r.term))
    layers: dict[str, list[Cluster]] = {}
    for name in order_layers((r.layer for r in rows), model_order):
        layers[name] = [Cluster(name, c, sizes[(layer, c)],
                                [t for _, t in sorted(terms.get((layer, c), []))])
                        for layer, c in sorted(k for k in sizes if k[0] == name)]
    return layers


def embed_clusters(layers: dict[str, list[Cluster]], embedder,
                   n_keywords: int) -> dict[tuple[str, int], np.ndarray]:
    """Unit embedding of each cluster's top keywords; clusters without keywords are left out."""
    clusters = [c for cs in layers.values() for c in cs if c.keywords]
    for c in (c for cs in layers.values() for c in cs if not c.keywords):
        log.warning("%s cluster %d has no keywords: it is left out of the trace", c.layer, c.cluster)
    if not clusters:
        return {}
    vectors = l2_normalise(embedder.encode([c.text(n_keywords) for c in clusters]), np.float64)
    return {c.key: v for c, v in zip(clusters, vectors)}


def usable(layers: dict[str, list[Cluster]], vectors) -> dict[str, list[Cluster]]:
    """Layers restricted to the clusters that have a vector; layers left empty are dropped."""
    kept = {name: [c for c in cs if c.key in vectors] for name, cs in layers.items()}
    return {name: cs for name, cs in kept.items() if cs}


def best_links(layers: dict[str, list[Cluster]], vectors,
               threshold: float) -> list[Link]:
    """Each cluster's most similar cluster in the next layer, kept when the cosine ≥ threshold."""
    names = list(layers)
    links = []
    for src_name, dst_name in zip(names, names[1:]):
        src, dst = layers[src_name], layers[dst_name]
        sims = np.array([vectors[c.key] for c in src]) @ np.array([vectors[c.key] for c in dst]).T
        for i, cluster in enumerate(src):
            j = int(np.argmax(sims[i]))
            if sims[i, j] >= threshold:
                links.append(Link(cluster, dst[j], float(sims[i, j])))
    return links


def follow_concept(query: np.ndarray, layers: dict[str, list[Cluster]], vectors) -> list[dict]:
    """The path of one cluster per layer that best follows ``query`` (a unit vector).

    Score of a path: Σ cos(query, cluster) + Σ cos(cluster, next cluster); found exactly by
    dynamic programming (Viterbi) over consecutive layers. Returns one dict per layer with the
    cluster, its similarity to the query and its similarity to the previous step.
    """
    names = list(layers)
    mats = [np.array([vectors[c.key] for c in layers[n]]) for n in names]
    relevance = [m @ query for m in mats]
    score = relevance[0].copy()
    back = []
    for prev, cur, rel in zip(mats, mats[1:], relevance[1:]):
        total = score[:, None] + prev @ cur.T  # rows: previous cluster, columns: current cluster
        back.append(np.argmax(total, axis=0))
        score = total.max(axis=0) + rel
    idx = [int(np.argmax(score))]
    for pointers in reversed(back):
        idx.append(int(pointers[idx[-1]]))
    idx.reverse()
    path = []
    for step, (name, i) in enumerate(zip(names, idx)):
        cluster = layers[name][i]
        link = float(mats[step - 1][idx[step - 1]] @ mats[step][i]) if step else float("nan")
        path.append({"cluster": cluster, "query_similarity": float(relevance[step][i]),
                     "link_similarity": link})
    return path


def layout(layers: dict[str, list[Cluster]], links: list[Link],
           extra: list[Cluster]) -> dict[tuple[str, int], tuple[float, float]]:
    """(x, y) in [0, 1] for each cluster shown: x by layer, y ordered to limit crossings.

    A cluster is shown when a link or the followed path touches it. In each column, clusters
    are sorted by the mean y of the clusters that link into them (barycentre heuristic); the first
    column and clusters without incoming links keep their id order at the end.
    """
    shown = {c.key for c in extra}
    for link in links:
        shown |= {link.source.key, link.target.key}
    names = [n for n in layers if any(c.key in shown for c in layers[n])]
    incoming: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for link in links:
        incoming.setdefault(link.target.key, []).append(link.source.key)
    pos: dict[tuple[str, int], tuple[float, float]] = {}
    for col, name in enumerate(names):
        column = [c for c in layers[name] if c.key in shown]

        def order(c):
            """Sort key: barycentre of placed sources, unplaced clusters last by id."""
            ys = [pos[s][1] for s in incoming.get(c.key, []) if s in pos]
            return (0, float(np.mean(ys)), c.cluster) if ys else (1, 0.0, c.cluster)

        column.sort(key=order)
        x = 0.5 if len(names) == 1 else 0.01 + 0.98 * col / (len(names) - 1)
        for row, c in enumerate(column):
            pos[c.key] = (x, (row + 0.5) / len(column))
    return pos


def node_label(c: Cluster) -> str:
    """Short node label, escaped: model-written text must not become markup (the column title
    names the layer)."""
    return html.escape(f"#{c.cluster}: {c.text(LABEL_TERMS)}")


def column_positions(label_chars: list[int]) -> tuple[list[float], int]:
    """x in [0, 1] of each column of the HTML Sankey and the width (px) of its plot area, from the
    longest label of each column (in characters), so that no two labels overlap.

    Plotly writes labels to the right of their node, except in the last column, where they go to
    its left: the gap before the last column holds two labels.
    """
    if len(label_chars) < 2:
        return [0.5] * len(label_chars), 0
    label_px = [chars * LABEL_CHAR_PX + COLUMN_PAD_PX for chars in label_chars]
    gaps = [label_px[i] + (label_px[i + 1] if i + 2 == len(label_px) else 0)
            for i in range(len(label_px) - 1)]
    total = float(sum(gaps))
    return [0.001 + 0.998 * sum(gaps[:i]) / total for i in range(len(label_chars))], int(total)


def build_figure(layers, links: list[Link], path: list[dict], n_keywords: int, title: str):
    """The plotly Sankey figure: nodes at ``layout`` positions, the followed path in red."""
    import plotly.graph_objects as go

    on_path = [step["cluster"] for step in path]
    path_pairs = {(a.key, b.key) for a, b in zip(on_path, on_path[1:])}
    drawn = list(links)
    linked = {(link.source.key, link.target.key) for link in links}
    for step_a, step_b in zip(path, path[1:]):
        # the path may use a pair that is not a kept best match: draw it so the path is whole
        if (step_a["cluster"].key, step_b["cluster"].key) not in linked:
            drawn.append(Link(step_a["cluster"], step_b["cluster"], step_b["link_similarity"]))
    pos = layout(layers, drawn, on_path)
    nodes = [c for cs in layers.values() for c in cs if c.key in pos]
    index = {c.key: i for i, c in enumerate(nodes)}
    path_keys = {c.key for c in on_path}
    node_hover = [html.escape(f"{c.layer}, cluster {c.cluster} ({c.size} neurons): "
                              f"{c.text(n_keywords)}") for c in nodes]
    link_hover = [html.escape(f"{link.source.text(n_keywords)} → {link.target.text(n_keywords)} "
                              f"(cosine {link.similarity:.2f})") for link in drawn]
    names = [n for n in layers if any(c.key in pos for c in layers[n])]
    column_x, plot_px = column_positions(
        [max(len(html.unescape(node_label(c))) for c in layers[n] if c.key in pos) for n in names])
    x_of = dict(zip(names, column_x))
    fig = go.Figure(go.Sankey(
        arrangement="fixed",
        node=dict(label=[node_label(c) for c in nodes], x=[x_of[c.layer] for c in nodes],
                  y=[pos[c.key][1] for c in nodes], pad=8, thickness=14,
                  color=[PATH_RED if c.key in path_keys else NODE_BLUE for c in nodes],
                  customdata=node_hover, hovertemplate="%{customdata}<extra></extra>"),
        link=dict(source=[index[link.source.key] for link in drawn],
                  target=[index[link.target.key] for link in drawn],
                  value=[max(link.similarity, 1e-3) for link in drawn],
                  color=[PATH_RED if (link.source.key, link.target.key) in path_pairs else LINK_GREY
                         for link in drawn],
                  customdata=link_hover, hovertemplate="%{customdata}<extra></extra>")))
    fig.update_layout(title=dict(text=html.escape(title)), font=dict(size=LABEL_FONT_PX),
                      height=max(450, 26 * max((sum(c.key in pos for c in cs)
                                                for cs in layers.values()), default=1) + 150),
                      annotations=[dict(text=f"<b>{html.escape(name)}</b>", x=x, y=1.0,
                                        xref="paper", yref="paper", yanchor="bottom",
                                        xanchor="right" if x > 0.5 and x == column_x[-1] else "left",
                                        showarrow=False) for name, x in x_of.items()])
    if plot_px:
        fig.update_layout(width=plot_px + 2 * MARGIN_PX, margin=dict(l=MARGIN_PX, r=MARGIN_PX))
    return fig, pos, drawn


def draw_png(layers, drawn: list[Link], pos, path: list[dict], title: str, out: Path) -> None:
    """Static drawing of the Sankey with matplotlib (no browser is needed to render it)."""
    import matplotlib.pyplot as plt

    fig = png_figure(layers, drawn, pos, path, title)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)


def png_figure(layers, drawn: list[Link], pos, path: list[dict], title: str):
    """The matplotlib figure of ``draw_png``; its width gives every column gap room for the
    longest label (PNG_LABEL_CHARS), so that labels never overlap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import PathPatch, Rectangle
    from matplotlib.path import Path as MplPath

    names = [n for n in layers if any(c.key in pos for c in layers[n])]
    tallest = max((sum(c.key in pos for c in layers[n]) for n in names), default=1)
    span = 1.0 if len(names) < 2 else 0.98 / (len(names) - 1)
    x_max = 1.0 + span * 0.6 if len(names) > 1 else 1.0
    # the axes fill about 96% of the figure once tight_layout has removed the empty margins
    width = PNG_GAP_IN * (x_max + 0.02) / span / 0.96 if len(names) > 1 else 6.0
    fig, ax = plt.subplots(figsize=(width, min(0.32 * tallest + 1.8, 150)))
    path_pairs = {(a["cluster"].key, b["cluster"].key) for a, b in zip(path, path[1:])}
    path_keys = {step["cluster"].key for step in path}
    node_w, node_h = 0.012, 0.6 / max(tallest, 1)
    for link in drawn:
        (x0, y0), (x1, y1) = pos[link.source.key], pos[link.target.key]
        mid = (x0 + x1) / 2
        curve = MplPath([(x0 + node_w, y0), (mid, y0), (mid, y1), (x1, y1)],
                        [MplPath.MOVETO, MplPath.CURVE4, MplPath.CURVE4, MplPath.CURVE4])
        red = (link.source.key, link.target.key) in path_pairs
        ax.add_patch(PathPatch(curve, fill=False, lw=0.5 + 5 * max(link.similarity, 0),
                               color="tab:red" if red else "0.6", alpha=0.9 if red else 0.45,
                               zorder=3 if red else 1))
    for name in names:
        for c in layers[name]:
            if c.key not in pos:
                continue
            x, y = pos[c.key]
            red = c.key in path_keys
            ax.add_patch(Rectangle((x, y - node_h / 2), node_w, node_h, zorder=4,
                                   color="tab:red" if red else "tab:blue"))
            label = f"#{c.cluster}: {c.text(LABEL_TERMS)}"
            if len(label) > PNG_LABEL_CHARS:
                label = label[:PNG_LABEL_CHARS - 1] + "…"
            # a white box keeps the label readable where links pass under it
            ax.text(x + node_w * 1.5, y, label, fontsize=PNG_FONT_PT, va="center", zorder=5,
                    color="tab:red" if red else "black",
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.75, pad=0.5))
        ax.text(pos[next(c.key for c in layers[name] if c.key in pos)][0], -0.03, name,
                fontsize=9, fontweight="bold", ha="left", va="bottom")
    if not drawn and not path:
        ax.text(0.5, 0.5, "no links between consecutive layers", ha="center", va="center")
    ax.set_xlim(-0.02, x_max)
    ax.set_ylim(1.02, -0.06)
    ax.axis("off")
    ax.set_title(title, fontsize=10, pad=14)  # clear of the layer names below it
    fig.tight_layout()
    return fig


def print_path(path: list[dict], query: str, n_keywords: int) -> None:
    """Print the followed path as a small table on stdout."""
    print(f"best path for {query!r}:")
    print(f"{'layer':<20} {'cluster':>7} {'query cos':>9} {'link cos':>8}  keywords")
    for step in path:
        c = step["cluster"]
        link = "" if np.isnan(step["link_similarity"]) else f"{step['link_similarity']:.3f}"
        print(f"{c.layer:<20} {c.cluster:>7} {step['query_similarity']:>9.3f} {link:>8}  "
              f"{c.text(n_keywords)}")


def run(run: Run, settings: Settings = Settings(), text_embedder=None) -> dict:
    """Link clusters of consecutive layers and write the run's 06_trace.csv, 06_sankey.html and
    .png.

    ``text_embedder`` (an object with ``.encode`` and ``.name``) may be injected; otherwise it
    is loaded from common.embedders. Returns the meta written (with the followed path, if any).
    """
    clusters_path, keywords_path, out_dir = run.clusters, run.keywords, run.folder
    # 01's layer order when 01_activations.npz is there, else 05_clusters.csv's own order
    activations_path = run.activations if run.activations.exists() else None
    kind, n_keywords, threshold = settings.kind, settings.n_keywords, settings.threshold
    follow = settings.follow
    for path in (clusters_path, keywords_path):
        if not Path(path).exists():
            raise StageError(f"{path} does not exist; run 05_cluster first (e.g. `make`)")
    if n_keywords < 1:
        raise StageError(f"--n-keywords must be at least 1, got {n_keywords}")
    input_metas = [read_meta(clusters_path), read_meta(keywords_path)]
    if activations_path is not None:
        input_metas.append(read_meta(activations_path))
    merge_lineage(input_metas)  # refuse, before any work, clusters and keywords of two runs
    sweep_temporaries(out_dir)  # what a killed earlier run left half-written
    retract_meta(run.meta("06_trace"))  # outputs are replaced from here on

    layers = load_clusters(clusters_path, keywords_path, kind,
                           read_layer_order(activations_path) if activations_path else [])
    if text_embedder is None:
        from common.embedders import load_text_embedder
        text_embedder = load_text_embedder(settings.text_embedder, device=settings.device)
    vectors = embed_clusters(layers, text_embedder, n_keywords)
    layers = usable(layers, vectors)
    if len(layers) < 2:
        log.warning("%d layer(s) with keyworded clusters: there is nothing to link; the trace "
                    "is empty", len(layers))
    links = best_links(layers, vectors, threshold)
    n_pairs = sum(len(cs) for cs in list(layers.values())[:-1])
    log.info("%d of %d clusters linked to the next layer at cosine ≥ %.2f", len(links), n_pairs,
             threshold)

    path: list[dict] = []
    if follow:
        if not layers:
            raise StageError("--follow needs clusters with keywords; 05_keywords.csv has none")
        query = l2_normalise(text_embedder.encode([follow]), np.float64)[0]
        path = follow_concept(query, layers, vectors)
        print_path(path, follow, n_keywords)

    rows = [{"source_layer": link.source.layer, "source_cluster": link.source.cluster,
             "source_keywords": link.source.text(n_keywords), "target_layer": link.target.layer,
             "target_cluster": link.target.cluster, "target_keywords": link.target.text(n_keywords),
             "similarity": f"{link.similarity:.6f}"} for link in links]
    write_csv(run.trace, rows, columns(TraceLink))
    title = (f"concept flow between layers ({kind} clusters, cosine ≥ {threshold:g})"
             + (f"; path of '{follow}' in red" if follow else ""))
    fig, pos, drawn = build_figure(layers, links, path, n_keywords, title)
    page = fig.to_html(include_plotlyjs=True, full_html=True, div_id="sankey",
                       config={"displaylogo": False})
    write_text(run.sankey_html, page)
    draw_png(layers, drawn, pos, path, title, run.sankey_png)

    args = {"clusters": str(clusters_path), "keywords": str(keywords_path),
            "activations": str(activations_path) if activations_path else None, "kind": kind,
            "n_keywords": n_keywords, "threshold": threshold, "follow": follow}
    followed = [{"layer": s["cluster"].layer, "cluster": s["cluster"].cluster,
                 "keywords": s["cluster"].text(n_keywords),
                 "query_similarity": round(s["query_similarity"], 6)} for s in path]
    return write_meta(run.meta("06_trace"), "06_trace", args, [run.trace],
                      inputs=input_metas, text_embedder=text_embedder.name, followed=followed)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the stage: ``--run`` and the fields of ``Settings``."""
    p = stage_parser(__doc__.split("\n\n")[0])
    add_run(p, "05_clusters.csv, 05_keywords.csv (and 01's layer order)",
            "06_trace.csv, 06_sankey.html and .png")
    add_settings(p, Settings)
    return p


@exit_on_stage_error
def main(argv=None):
    """Parse arguments and run the stage."""
    args = start_stage(build_parser(), argv)
    run(Run(args.run), settings_from(Settings, args))


if __name__ == "__main__":
    main()
