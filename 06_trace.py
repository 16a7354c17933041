"""Stage 06: trace concepts through the layers, linking each cluster to its closest in the next layer.

Reads, in the run folder (--run)
    05_clusters.csv       which neurons form which cluster (for cluster sizes), per layer and kind
    05_keywords.csv       the top TF-IDF terms of every cluster
    01_activations.npz    optional, only its ``layers`` array: the model's layer order (else the
                          order of 05_clusters.csv, which 05 wrote in that order)
    01_predictions.csv    the usable images, of which --connect-images are sampled (seeded) to
                          measure the connections, with 01_extract.meta.json (the model to re-run,
                          named again by --model / --weights as for 08)
Writes, in the run folder
    06_connections.npz    how much each neuron of a chosen layer drives each neuron of the next
                          (activation × gradient, averaged over the sample; common/attribution.py),
                          with 06_connections.meta.json. Computed once: kept while 01's outputs
                          and the sample settings are unchanged, so a new --threshold or --follow
                          does not re-run the model. Empty, with the reason in its meta, when the
                          model cannot be run or --connect-images is 0.
    06_trace.csv          source_layer, source_cluster, source_keywords, target_layer,
                          target_cluster, target_keywords, similarity, kind (sentence or
                          connection)
    06_sankey.html        interactive Sankey diagram, plotly.js inlined (opens offline); a menu
                          switches between the trace by sentences and the trace by connections
    06_sankey.png         the trace by sentences drawn with matplotlib
    06_trace.meta.json

Each cluster is represented by the text embedding of its top keywords ("yellow, lemon, fruit").
Every cluster of layer L is linked to the most similar cluster of layer L+1 (cosine); links below
--threshold are dropped. With --follow TEXT the path of clusters, one per layer, that best keeps
to that concept is printed and highlighted: it maximises the summed similarity of each cluster to
the query plus the summed similarity of consecutive clusters (dynamic programming over layers).

The trace by connections links clusters through the network itself, so that a concept can be
followed where the sentences switch vocabulary (from appearance words to object words). With C the
connection strengths of two consecutive layers (negative values, which hold a neuron back, set to
0), the strength from cluster A to cluster B is their share of the layer pair's drive over the
share their sizes would give: (Σ_{i∈A, j∈B} C_ij / Σ C) / (|A|·|B| / (N·M)), N and M the clustered
neurons of the two layers; 1 is what random wiring would give. Each cluster is linked to the
cluster of the next layer it drives most, when that strength is at least --connect-threshold (1).
Clusters are made from sentences, not wiring, so a best link can be no stronger than random
clusters of the same sizes would get: each link's permutation p-value (999 seeded reshuffles of
which neurons form the layer's clusters) says how often they do as well; links with p > 0.05 are
drawn faint and named so on hover.

Example:
    python 06_trace.py --run data/demo --follow yellow
"""
import argparse
import collections
import html
import logging
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.artefacts import (Run, TraceLink, columns, order_layers, read_clusters,
                              read_connections, read_keywords, read_layer_order, read_predictions,
                              write_connections)
from common.cli import (ModelAgain, StageError, add_run, add_settings, exit_on_stage_error,
                        setting, settings_from, stage_parser, start_stage)
from common.embedders import l2_normalise
from common.io import atomic_path, sweep_temporaries, write_csv, write_text
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta
from common.trace import SIGNIFICANT_P, column_rows

log = logging.getLogger("neuron-atlas.06_trace")


@dataclass(frozen=True)
class Settings(ModelAgain):
    """Stage 06's settings: one flag each (``--threshold`` …), defaults written here only; the
    model re-run for the connections is named again by ``ModelAgain``'s fields."""

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
    connect_images: int = setting(
        16, "usable images (seeded sample) over which the connections between consecutive "
        "layers are averaged (0: no trace by connections)", make="CONNECT_IMAGES")
    connect_by: str = setting("mean", "what of a later neuron's map the connections explain",
                              choices=("mean", "max"))
    connect_threshold: float = setting(
        1.0, "smallest connection strength kept as a link (1: as random wiring would give)",
        make="CONNECT_THRESHOLD")
    batch_size: int = setting(16, "images per pass when measuring connections")
    seed: int = setting(0, "seed of the image sample")

LABEL_TERMS = 3  # keywords shown in a node label (hover shows all --n-keywords)
LABEL_FONT_PX = 12  # label text size of the HTML Sankey
LABEL_CHAR_PX = 7.5  # widest average character of that font, so that widths are not underestimated
COLUMN_PAD_PX = 40  # space between a label and the next column's node
MARGIN_PX = 40  # left and right margin of the HTML Sankey
MIN_WIDTH_PX = 640  # narrowest HTML Sankey: room for its title lines and buttons
TITLE_CHARS = 70  # longest line of the HTML Sankey's title
PNG_LABEL_CHARS = 38  # longer node labels are cut in the PNG
PNG_FONT_PT = 9  # label size in the PNG: readable at its own size (110 dpi)
PNG_GAP_IN = PNG_LABEL_CHARS * PNG_FONT_PT * 0.62 / 72 + 0.5  # column gap (in) that holds a label
LINK_GREY = "rgba(140, 140, 140, 0.35)"  # ordinary links
PATH_RED = "rgba(214, 39, 40, 0.85)"  # nodes and links of the --follow path
NODE_BLUE = "rgba(31, 119, 180, 0.9)"  # ordinary nodes
UNLINKED_GREY = "rgba(150, 150, 150, 0.6)"  # clusters without a link at the threshold
INVISIBLE = "rgba(0, 0, 0, 0)"  # the loop that keeps an unlinked cluster on the page
FAINT_GREY = "rgba(170, 170, 170, 0.15)"  # links by connections that random clusters match
PERMUTATIONS = 999  # random clusterings behind each connection link's p-value


@dataclass
class Cluster:
    """One cluster of one layer: its id, number of neurons, ranked keywords and channels."""
    layer: str
    cluster: int
    size: int
    keywords: list[str]
    channels: list[int] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int]:
        """(layer, cluster): the cluster's identity."""
        return self.layer, self.cluster

    def text(self, n: int) -> str:
        """The first ``n`` keywords joined by commas: what is embedded and shown."""
        return ", ".join(self.keywords[:n])


@dataclass
class Link:
    """A kept best match between a cluster and a cluster of the next layer (``p_value``: for a
    link by connections, how often random clusters do as well; ``connection_links``)."""
    source: Cluster
    target: Cluster
    similarity: float
    p_value: float = float("nan")

    @property
    def weak(self) -> bool:
        """A link by connections that random clusters of the same sizes match too often
        (p > ``SIGNIFICANT_P``): drawn faint."""
        return self.p_value > SIGNIFICANT_P


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
    members: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    for r in rows:
        members[(r.layer, r.cluster)].append(r.channel)
    terms: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for r in read_keywords(keywords_path):
        if r.kind == kind and r.cluster is not None:
            terms.setdefault((r.layer, r.cluster), []).append((r.rank, r.term))
    layers: dict[str, list[Cluster]] = {}
    for name in order_layers((r.layer for r in rows), model_order):
        layers[name] = [Cluster(name, c, sizes[(layer, c)],
                                [t for _, t in sorted(terms.get((layer, c), []))],
                                sorted(members[(layer, c)]))
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


def connection_links(layers: dict[str, list[Cluster]], connections, threshold: float,
                     permutations: int = PERMUTATIONS, seed: int = 0) -> list[Link]:
    """Each cluster's most strongly driven cluster in the next layer, by the network's connections
    (``common.artefacts.Connections``), kept when the normalised strength (module docstring:
    1 = as random wiring would give) is at least ``threshold``. Layers without connections
    between them (not consecutive chosen layers) get no links.

    Each link carries a permutation p-value: how often ``permutations`` seeded random clusters of
    the same sizes (the source layer's clustered neurons dealt out again at random) give their
    cluster a best strength as high as the real one, counting the real one:
    (1 + hits) / (1 + permutations). A small p says the cluster's neurons drive the target more
    than a random set of as many neurons of that layer would."""
    rng = np.random.default_rng(seed)
    names = list(layers)
    links = []
    for src_name, dst_name in zip(names, names[1:]):
        pair = connections.pair(src_name) if connections is not None else None
        if pair is None or pair[0] != dst_name:
            continue
        drive = np.clip(pair[1].astype(np.float64), 0, None)
        src = [c for c in layers[src_name] if c.channels and max(c.channels) < drive.shape[0]]
        dst = [c for c in layers[dst_name] if c.channels and max(c.channels) < drive.shape[1]]
        rows = [i for c in src for i in c.channels]
        cols = [j for c in dst for j in c.channels]
        total = drive[np.ix_(rows, cols)].sum() if rows and cols else 0.0
        if total <= 0:
            continue
        # Drive of each clustered source neuron into each target cluster (rows × targets).
        into = np.stack([drive[np.ix_(rows, b.channels)].sum(1) for b in dst], axis=1)
        owner = np.repeat(np.arange(len(src)), [len(a.channels) for a in src])
        sizes_a = np.bincount(owner, minlength=len(src)).astype(np.float64)
        sizes_b = np.array([len(b.channels) for b in dst], np.float64)
        expected = np.outer(sizes_a, sizes_b) / (len(rows) * len(cols))

        def strengths(labels: np.ndarray) -> np.ndarray:
            """Source clusters × target clusters strengths when the source neurons are in the
            clusters ``labels``."""
            summed = np.zeros((len(src), len(dst)))
            np.add.at(summed, labels, into)
            return summed / total / expected

        lifts = strengths(owner)
        best = lifts.max(axis=1)
        hits = np.zeros(len(src))
        for _ in range(permutations):
            hits += strengths(rng.permutation(owner)).max(axis=1) >= best - 1e-12
        for k, a in enumerate(src):
            j = int(np.argmax(lifts[k]))
            if lifts[k, j] >= threshold:
                links.append(Link(a, dst[j], float(lifts[k, j]),
                                  float((1 + hits[k]) / (1 + permutations))))
    return links


def sample_images(run: Run, n: int, seed: int) -> list[tuple[int, str, int]]:
    """A seeded sample of ``n`` usable images of 01_predictions.csv as ``(id, path, label)``, in
    id order (all of them when there are fewer)."""
    rows = read_predictions(run.predictions)
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(rows), size=min(n, len(rows)), replace=False)) if rows else []
    return [(rows[i].image_id, rows[i].path, rows[i].label_idx) for i in pick]


def measure_connections(bundle, layers: list[str], images: list[tuple[int, str, int]],
                        aggregate: str, batch_size: int) -> tuple[list[str], dict, int]:
    """Mean activation × gradient between consecutive ``layers`` over ``images``
    (``common.attribution.connection_strengths``): the layers in the order they run,
    ``{source layer: matrix}`` and the number of images read."""
    from common.attribution import connection_strengths
    from common.rerun import image_batches
    sums: dict[tuple[str, str], np.ndarray] = {}
    count = 0
    for ids, _, batch in image_batches(bundle, images, batch_size, desc="06 connections"):
        for pair, matrix in connection_strengths(bundle.model, layers, batch, aggregate).items():
            sums[pair] = sums.get(pair, 0) + matrix
        count += len(ids)
    order = [a for a, _ in sums] + [b for _, b in list(sums)[-1:]]
    return order, ({a: m / count for (a, _), m in sums.items()} if count else {}), count


def previous_connections(run: Run) -> dict | None:
    """What the last finished 06 recorded of its connections (``connection_record``), when
    06_connections.npz is still the file it wrote; None otherwise. Read before 06 retracts its
    meta."""
    if not run.connections.exists() or not run.meta("06_trace").exists():
        return None
    try:
        return read_meta(run.connections).get("connections")
    except (StageError, OSError, ValueError) as err:  # changed or broken: measured again
        log.info("06_connections.npz is measured again: %s", err)
        return None


def connections(run: Run, settings: Settings, layer_order: list[str], previous: dict | None,
                bundle=None) -> tuple:
    """06_connections.npz, measured unless ``previous`` (``previous_connections``) was made from
    the same 01 outputs with the same sample settings. Returns ``(Connections, record)``: the
    record (sample settings, 01's fingerprint, images read, and why the file is empty,
    if it is) goes into 06's meta; ``bundle`` (a ``common.models.ModelBundle``) may be
    injected."""
    wanted = {"connect_images": settings.connect_images, "connect_by": settings.connect_by,
              "seed": settings.seed, "layers": layer_order}
    have_01 = run.activations.exists() and run.predictions.exists()
    extract = read_meta(run.activations).get("fingerprint") if have_01 else None
    if previous and previous.get("args") == wanted and previous.get("extract") == extract \
            and run.connections.is_file():
        log.info("connections kept from %s (same 01 outputs and sample)", run.connections)
        # touched: an output older than this run's inputs would leave make thinking 06 is never
        # up to date
        run.connections.touch()
        return read_connections(run.connections), previous
    reason, to_next, count, seconds, ran = "", {}, 0, 0.0, layer_order
    if not have_01:
        reason = "no 01 outputs (01_activations.npz, 01_predictions.csv) to re-run the model on"
    elif settings.connect_images <= 0:
        reason = "--connect-images is 0"
    elif len(layer_order) < 2:
        reason = "fewer than two layers"
    else:
        import time
        start = time.perf_counter()
        try:
            if bundle is None:
                from common.rerun import load_run_model
                bundle = load_run_model(read_meta(run.activations), device=settings.device,
                                        **settings.model_again())
            ran, to_next, count = measure_connections(
                bundle, layer_order, sample_images(run, settings.connect_images, settings.seed),
                settings.connect_by, settings.batch_size)
        except (StageError, OSError, RuntimeError, ValueError) as err:
            reason = f"the model could not be run ({err})"
        if not reason and not count:
            reason = "no sampled image could be read"
        seconds = round(time.perf_counter() - start, 1)
    if reason:
        log.warning("no trace by connections: %s", reason)
        to_next, count = {}, 0
    else:
        log.info("connections between %d layer pairs measured on %d images in %.1f s",
                 len(to_next), count, seconds)
    write_connections(run.connections, ran, to_next, count, settings.connect_by)
    record = {"args": wanted, "extract": extract, "n_images": count,  # no time: a meta is
              "reason": reason}                                    # the same on every re-run
    return read_connections(run.connections), record


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


def layout(layers: dict[str, list[Cluster]],
           links: list[Link]) -> dict[tuple[str, int], tuple[float, float]]:
    """(x, y) in [0, 1] for every cluster, linked or not: x by layer, y ordered to limit crossings
    (``common.trace.column_rows``: barycentre of the clusters linking in; by id otherwise)."""
    names = [n for n in layers if layers[n]]
    rows = column_rows([[c.key for c in layers[n]] for n in names],
                       [(link.source.key, link.target.key) for link in links])
    pos: dict[tuple[str, int], tuple[float, float]] = {}
    for col, name in enumerate(names):
        x = 0.5 if len(names) == 1 else 0.01 + 0.98 * col / (len(names) - 1)
        for c in layers[name]:
            pos[c.key] = (x, rows[c.key])
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


def with_path(links: list[Link], path: list[dict]) -> list[Link]:
    """``links`` plus the steps of the followed path that are not among them, so that the path is
    drawn whole (it may use a pair that is not a kept best match)."""
    drawn = list(links)
    linked = {(link.source.key, link.target.key) for link in links}
    for step_a, step_b in zip(path, path[1:]):
        if (step_a["cluster"].key, step_b["cluster"].key) not in linked:
            drawn.append(Link(step_a["cluster"], step_b["cluster"], step_b["link_similarity"]))
    return drawn


def sankey_trace(layers, drawn: list[Link], pos, x_of: dict, path: list[dict], n_keywords: int,
                 measure: str, visible: bool = True):
    """One plotly Sankey of every cluster at ``pos`` (y) and its layer's column ``x_of``, with the
    ``drawn`` links (their ``similarity`` named ``measure`` on hover) and the path in red.

    A cluster without a link is drawn grey, held up by an invisible loop onto itself: plotly
    leaves out nodes that no link touches."""
    import plotly.graph_objects as go

    on_path = [step["cluster"] for step in path]
    path_pairs = {(a.key, b.key) for a, b in zip(on_path, on_path[1:])}
    path_keys = {c.key for c in on_path}
    nodes = [c for cs in layers.values() for c in cs if c.key in pos]
    index = {c.key: i for i, c in enumerate(nodes)}
    touched = {k for link in drawn for k in (link.source.key, link.target.key)}
    loners = [c for c in nodes if c.key not in touched]
    values = [max(link.similarity, 1e-3) for link in drawn]
    loop = float(np.median(values)) if values else 1.0
    colour = {c.key: PATH_RED if c.key in path_keys else NODE_BLUE if c.key in touched
              else UNLINKED_GREY for c in nodes}
    node_hover = [html.escape(f"{c.layer}, cluster {c.cluster} ({c.size} neurons): "
                              f"{c.text(n_keywords)}"
                              + ("" if c.key in touched else f" — no link by {measure}"))
                  for c in nodes]
    link_hover = [html.escape(f"{link.source.text(n_keywords)} → {link.target.text(n_keywords)} "
                              f"({measure} {link.similarity:.2f}"
                              + ("" if np.isnan(link.p_value) else
                                 f", p = {link.p_value:.3f}"
                                 + ("; random clusters do as well" if link.weak else ""))
                              + ")") for link in drawn]
    return go.Sankey(
        arrangement="fixed", visible=visible,
        node=dict(label=[node_label(c) for c in nodes], x=[x_of[c.layer] for c in nodes],
                  y=[pos[c.key][1] for c in nodes], pad=8, thickness=14,
                  color=[colour[c.key] for c in nodes],
                  customdata=node_hover, hovertemplate="%{customdata}<extra></extra>"),
        link=dict(source=[index[link.source.key] for link in drawn] + [index[c.key] for c in loners],
                  target=[index[link.target.key] for link in drawn] + [index[c.key] for c in loners],
                  value=values + [loop] * len(loners),
                  color=[PATH_RED if (link.source.key, link.target.key) in path_pairs
                         else FAINT_GREY if link.weak else LINK_GREY
                         for link in drawn] + [INVISIBLE] * len(loners),
                  customdata=link_hover + ["no link"] * len(loners),
                  hovertemplate="%{customdata}<extra></extra>"))


def build_figure(layers, links: list[Link], path: list[dict], n_keywords: int, title: str,
                 connected: tuple[list[Link], str] | None = None):
    """The plotly Sankey figure: every cluster in its layer's labelled column, the followed path
    in red. With ``connected`` (the links by connections and their title) a second Sankey is
    added, hidden, and a menu switches between the two traces. Returns the figure, the positions
    and the drawn links of the trace by sentences (for the PNG)."""
    import plotly.graph_objects as go

    drawn = with_path(links, path)
    pos = layout(layers, drawn)
    names = [n for n in layers if any(c.key in pos for c in layers[n])]
    column_x, plot_px = column_positions(
        [max(len(html.unescape(node_label(c))) for c in layers[n] if c.key in pos) for n in names])
    x_of = dict(zip(names, column_x))
    fig = go.Figure(sankey_trace(layers, drawn, pos, x_of, path, n_keywords, "cosine"))
    if connected is not None:
        by_wiring, wiring_title = connected
        fig.add_trace(sankey_trace(layers, by_wiring, layout(layers, by_wiring), x_of, [],
                                   n_keywords, "strength", visible=False))
        fig.update_layout(updatemenus=[dict(
            type="buttons", direction="right", x=0, y=1.0, xanchor="left", yanchor="bottom",
            pad=dict(b=28), showactive=True, buttons=[
                dict(label="by sentences", method="update",
                     args=[{"visible": [True, False]}, {"title.text": wrapped(title)}]),
                dict(label="by connections", method="update",
                     args=[{"visible": [False, True]},
                           {"title.text": wrapped(wiring_title)}])])])
    fig.update_layout(title=dict(text=wrapped(title), x=0.02, xref="container", y=1,
                                 yref="container", yanchor="top", pad=dict(t=14)),
                      font=dict(size=LABEL_FONT_PX),
                      height=max(450, 26 * max((sum(c.key in pos for c in cs)
                                                for cs in layers.values()), default=1) + 150),
                      margin=dict(t=150 if connected is not None else 110),
                      annotations=[dict(text=f"<b>{html.escape(name)}</b>", x=x, y=1.0,
                                        xref="paper", yref="paper", yanchor="bottom",
                                        xanchor="right" if x > 0.5 and x == column_x[-1] else "left",
                                        showarrow=False) for name, x in x_of.items()])
    if plot_px:
        fig.update_layout(width=max(plot_px + 2 * MARGIN_PX, MIN_WIDTH_PX),
                          margin=dict(l=MARGIN_PX, r=MARGIN_PX))
    return fig, pos, drawn


def wrapped(title: str) -> str:
    """A plotly title, escaped, on lines of at most TITLE_CHARS characters."""
    return "<br>".join(textwrap.wrap(html.escape(title), TITLE_CHARS))


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


def run(run: Run, settings: Settings = Settings(), text_embedder=None, bundle=None) -> dict:
    """Link clusters of consecutive layers, by their sentences and by the network's connections,
    and write the run's 06_connections.npz, 06_trace.csv, 06_sankey.html and .png.

    ``text_embedder`` (an object with ``.encode`` and ``.name``) may be injected; otherwise it
    is loaded from common.embedders; so may ``bundle``, the model whose connections are measured
    (else 01's, named again by the settings). Returns the meta written (with the followed path,
    if any).
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
    previous = previous_connections(run)
    retract_meta(run.meta("06_trace"))  # outputs are replaced from here on

    order = read_layer_order(activations_path) if activations_path else []
    every = load_clusters(clusters_path, keywords_path, kind, order)
    wiring, record = connections(run, settings, order, previous, bundle)
    by_wiring = connection_links(every, wiring, settings.connect_threshold, seed=settings.seed)
    log.info("%d clusters linked to the next layer by connections at strength ≥ %.2f, %d of "
             "them more than random clusters give (permutation p ≤ %g)", len(by_wiring),
             settings.connect_threshold, sum(not link.weak for link in by_wiring), SIGNIFICANT_P)
    if text_embedder is None:
        from common.embedders import load_text_embedder
        text_embedder = load_text_embedder(settings.text_embedder, device=settings.device)
    vectors = embed_clusters(every, text_embedder, n_keywords)
    layers = usable(every, vectors)
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
             "similarity": f"{link.similarity:.6f}", "kind": link_kind,
             "p_value": "" if np.isnan(link.p_value) else f"{link.p_value:.4f}"}
            for link_kind, kept in (("sentence", links), ("connection", by_wiring))
            for link in kept]
    write_csv(run.trace, rows, columns(TraceLink))
    title = (f"concept flow between layers by sentences ({kind} clusters, keyword cosine ≥ "
             f"{threshold:g})" + (f"; path of '{follow}' in red" if follow else "")
             + "; grey: no link")
    wiring_title = (f"concept flow between layers by connections ({kind} clusters, strength ≥ "
                    f"{settings.connect_threshold:g} × random wiring; activation × gradient on "
                    f"{record['n_images']} images); faint: random clusters do as well "
                    f"(p > {SIGNIFICANT_P:g}); grey: no link")
    if record["reason"]:
        wiring_title = f"no trace by connections: {record['reason']}"
    fig, pos, drawn = build_figure(every, links, path, n_keywords, title,
                                   connected=(by_wiring, wiring_title))
    page = fig.to_html(include_plotlyjs=True, full_html=True, div_id="sankey",
                       config={"displaylogo": False, "displayModeBar": False})
    write_text(run.sankey_html, page)
    draw_png(every, drawn, pos, path, title, run.sankey_png)

    args = {"clusters": str(clusters_path), "keywords": str(keywords_path),
            "activations": str(activations_path) if activations_path else None, "kind": kind,
            "n_keywords": n_keywords, "threshold": threshold, "follow": follow,
            "connect_threshold": settings.connect_threshold}
    followed = [{"layer": s["cluster"].layer, "cluster": s["cluster"].cluster,
                 "keywords": s["cluster"].text(n_keywords),
                 "query_similarity": round(s["query_similarity"], 6)} for s in path]
    return write_meta(run.meta("06_trace"), "06_trace", args, [run.trace, run.connections],
                      inputs=input_metas, text_embedder=text_embedder.name, followed=followed,
                      connections=record)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the stage: ``--run`` and the fields of ``Settings``."""
    p = stage_parser(__doc__.split("\n\n")[0])
    add_run(p, "05_clusters.csv, 05_keywords.csv (and 01's layer order)",
            "06_connections.npz, 06_trace.csv, 06_sankey.html and .png")
    add_settings(p, Settings)
    return p


@exit_on_stage_error
def main(argv=None):
    """Parse arguments and run the stage."""
    args = start_stage(build_parser(), argv)
    run(Run(args.run), settings_from(Settings, args))


if __name__ == "__main__":
    main()
