"""The contract files of a run (ARTEFACTS.md): one typed reader per file, writers where they help.

Every stage, test and benchmark reads a contract file through this module, so a column is parsed
in one place. A CSV row becomes a frozen dataclass whose field types say how each cell is read:
``int``, ``float`` (an empty cell is NaN), ``str``, ``Path``, space-separated ``tuple[int, ...]``
and ``tuple[float, ...]``, ``bool | None`` (empty: None) and ``int | None`` (empty or ``all``:
None). A missing file or column is a StageError that names the file and the stage that makes it;
a field with a default is an optional column (absent: the default).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from common.cli import StageError
from common.io import load_npz, read_csv, read_json, save_npz, write_csv
from common.mosaics import cut_tiles, load_mosaic

log = logging.getLogger("neuron-atlas.artefacts")


# ---------------------------------------------------------------------------------------------
# The run folder: where each contract file lies


def layer_slug(layer: str) -> str:
    """The one name a layer's folder or file gets (``_blocks.3`` stays, ``a/b`` → ``a_b``): runs of
    anything but ASCII letters, digits, ``.``, ``_`` and ``-`` become ``_``; no leading or trailing
    dot (no hidden file, no ``..``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", layer).strip(".") or "layer"


def neuron_page(layer: str, channel: int) -> str:
    """The atlas page of a neuron, as a path inside the atlas folder (links from 08's reports
    and from 10's pages)."""
    return f"neurons/{layer_slug(layer)}/{int(channel)}.html"


def layer_dir(parent: str | Path, layer: str) -> Path:
    """The folder of ``layer`` inside ``parent`` (a stage's per-layer outputs)."""
    return Path(parent) / layer_slug(layer)


class _InRun:
    """A contract file's place in its folder: ``Run.mosaics`` → ``<run>/02_mosaics.csv``."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, run, owner=None):
        return self if run is None else run.folder / self.name


class _Folder:
    """A folder of the contract; its subclasses list its files as ``_InRun`` properties."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.folder)!r})"


class PairFolder(_Folder):
    """One analysed confusion pair of 08 (``08_debug/<true>__<pred>/``)."""

    neurons = _InRun("neurons.csv")
    delta_png = _InRun("delta_mu.png")
    heat_png = _InRun("z_heatmaps.png")
    strips = _InRun("neurons")
    ko_examples = _InRun("ko_examples.jpg")
    ok_examples = _InRun("ok_examples.jpg")
    ablation = _InRun("ablation.csv")
    causal = _InRun("causal.json")
    record = _InRun("pair.json")  # its report.md and .html: common.render.report_paths
    why = _InRun("why.npz")  # per misclassified image: its top neurons of all layers, maps
    why_strips = _InRun("why")  # <image id>.jpg: the image and those neurons' maps side by side
    blocks = _InRun("report.json")  # the report as render blocks, for the atlas's linked copy


class Comparison(_Folder):
    """12's comparison of a run with another (``<run>/12_compare__<other>/``)."""

    matches = _InRun("12_matches.csv")
    alignment = _InRun("12_alignment.csv")
    alignment_png = _InRun("12_alignment.png")
    concepts = _InRun("12_concepts.csv")
    scores = _InRun("12_scores.csv")
    report = _InRun("12_report.md")
    meta = _InRun("12_compare.meta.json")


class DescribedMosaics(_Folder):
    """Mosaics 11 had described: its baskets' (``11_baskets/``) or a set's
    (``11_sets/<op>__<A>__<B>/``)."""

    index = _InRun("11_mosaics.csv")
    meta = _InRun("11_mosaics.meta.json")
    descriptions = _InRun("03_descriptions.csv")


class Run(_Folder):
    """A run folder (``data/<RUN>/``) and the path of every file of the artefact contract in it
    (ARTEFACTS.md), one property each; ``meta(stage)`` is a stage's provenance file, ``pair`` and
    ``comparison`` the folders of 08's pairs and 12's comparisons."""

    images = _InRun("01_images.csv")
    predictions = _InRun("01_predictions.csv")
    activations = _InRun("01_activations.npz")
    stats = _InRun("01_stats")
    mosaic_dir = _InRun("02_mosaics")
    mosaics = _InRun("02_mosaics.csv")
    descriptions = _InRun("03_descriptions.csv")
    embeddings = _InRun("04_embeddings.npz")
    crop_vectors = _InRun("04_crops.npz")
    clusters = _InRun("05_clusters.csv")
    metrics = _InRun("05_metrics.csv")
    ksearch = _InRun("05_ksearch.csv")
    keywords = _InRun("05_keywords.csv")
    categories = _InRun("05_categories.csv")
    plots = _InRun("05_plots")
    trace = _InRun("06_trace.csv")
    connections = _InRun("06_connections.npz")
    sankey_html = _InRun("06_sankey.html")
    sankey_png = _InRun("06_sankey.png")
    confusion = _InRun("08_confusion.csv")
    debug = _InRun("08_debug")
    pairs = _InRun("08_debug/pairs.csv")
    debug_note = _InRun("08_debug/note.md")
    attributions = _InRun("08_debug/attributions.npz")
    scores = _InRun("09_scores.csv")
    summary = _InRun("09_summary.csv")
    eval = _InRun("09_eval.csv")
    candidates = _InRun("09_candidates.csv")
    subconcepts = _InRun("09_subconcepts")
    subconcept_mosaics = _InRun("09_subconcepts/09_mosaics.csv")
    subconcept_meta = _InRun("09_subconcepts/09_mosaics.meta.json")
    subconcept_descriptions = _InRun("09_subconcepts/03_descriptions.csv")
    atlas = _InRun("atlas")
    baskets = _InRun("11_baskets.csv")
    tree = _InRun("11_tree.npz")
    pruning = _InRun("11_pruning.csv")
    consistency = _InRun("11_consistency.csv")
    basket_dir = _InRun("11_baskets")
    basket_sets = _InRun("11_sets")
    relevance = _InRun("13_relevance.npz")
    audit_dir = _InRun("13_audit")
    audit = _InRun("13_audit/audit.csv")
    audit_summary = _InRun("13_audit/summary.csv")
    audit_reliance = _InRun("13_audit/reliance.csv")
    audit_meta = _InRun("13_audit/13_audit.meta.json")
    describer_dir = _InRun("14_describers")
    describer_neurons = _InRun("14_describers/neurons.csv")
    describer_summary = _InRun("14_describers/summary.csv")
    describer_meta = _InRun("14_describers/14_describers.meta.json")
    labels = _InRun("15_labels.csv")
    label_concepts = _InRun("15_concepts.csv")

    def meta(self, stage: str) -> Path:
        """The provenance file of ``stage`` (``"04_embed"`` → ``<run>/04_embed.meta.json``)."""
        return self.folder / f"{stage}.meta.json"

    def pair(self, name: str) -> PairFolder:
        """08's folder of one analysed pair (``name`` is pairs.csv's ``folder``)."""
        return PairFolder(self.debug / name)

    def described_by(self, name: str) -> Path:
        """14's sentences of describer ``name`` (03's format)."""
        return self.describer_dir / name / "03_descriptions.csv"

    def comparison(self, other: str) -> Comparison:
        """12's folder comparing this run with run ``other``."""
        return Comparison(self.folder / f"12_compare__{other}")


def _as_float(text: str) -> float:
    """A CSV cell as a float; empty means undefined (NaN)."""
    return float(text) if text.strip() else math.nan


def _as_bool(text: str) -> bool | None:
    """``1``/``true`` or ``0``/``false``; empty means unknown (None)."""
    text = text.strip().lower()
    return None if not text else text in ("1", "true", "yes")


_CELL = {  # field annotation → parser of the cell
    "int": int,
    "float": _as_float,
    "str": str,
    "Path": Path,
    "tuple[int, ...]": lambda text: tuple(int(v) for v in text.split()),
    "tuple[float, ...]": lambda text: tuple(float(v) for v in text.split()),
    "bool | None": _as_bool,
    "int | None": lambda text: None if text in ("", "all") else int(text),
}


def columns(row_type) -> list[str]:
    """The CSV columns of a row dataclass, in file order (its field order)."""
    return [f.name for f in dataclasses.fields(row_type)]


def _read_rows(path: str | Path, row_type, producer: str, required: bool = True,
               renamed: dict[str, str] | None = None) -> list:
    """Rows of the CSV at ``path`` as ``row_type`` instances (see the module docstring).

    ``required=False`` turns a missing file into an empty list and a warning, for the readers of
    optional inputs (descriptions and mosaics shown beside search hits). ``renamed`` maps a field
    to its column where the column is no valid Python name (``class``).
    """
    path = Path(path)
    if not path.exists():
        if not required:
            log.warning("%s not found: going on without it", path)
            return []
        raise StageError(f"{path} not found: run {producer} first")
    rows = read_csv(path)
    column_of = {f.name: (renamed or {}).get(f.name, f.name) for f in dataclasses.fields(row_type)}
    parse = {f.name: _CELL[f.type] for f in dataclasses.fields(row_type)}
    optional = {f.name for f in dataclasses.fields(row_type)
                if f.default is not dataclasses.MISSING}
    if rows:
        missing = [c for name, c in column_of.items()
                   if c not in rows[0] and name not in optional]
        if missing:
            raise StageError(f"{path} lacks the columns {missing}: re-run {producer}")
    out = []
    for line, row in enumerate(rows, start=2):
        try:
            out.append(row_type(**{name: parse[name](row[column] or "")
                                   for name, column in column_of.items() if column in row}))
        except ValueError as err:
            raise StageError(f"{path} line {line}: {err}; re-run {producer}") from err
    return out


# ---------------------------------------------------------------------------------------------
# 01_extract


@dataclass(frozen=True)
class ImageRow:
    """A row of 01_images.csv: one listed file (``status`` ok or skipped, ``reason`` why)."""
    image_id: int
    path: str
    label: str
    label_idx: int
    status: str
    reason: str


def read_images(path: str | Path) -> list[ImageRow]:
    """Every row of 01_images.csv, in image-id order."""
    return _read_rows(path, ImageRow, "01_extract")


@dataclass(frozen=True)
class Prediction:
    """A row of 01_predictions.csv (usable images only); ``correct`` is None without a label."""
    image_id: int
    path: str
    label: str
    label_idx: int
    pred_idx: int
    pred_name: str
    prob: float
    correct: bool | None
    top5_idx: tuple[int, ...]
    top5_prob: tuple[float, ...]


def read_predictions(path: str | Path) -> list[Prediction]:
    """Every row of 01_predictions.csv."""
    return _read_rows(path, Prediction, "01_extract")


@dataclass
class LayerTopK:
    """One layer's part of 01_activations.npz."""

    name: str
    values: np.ndarray      # C × k, descending; NaN where fewer than k images
    image_ids: np.ndarray   # C × k, −1 where fewer than k images
    y: np.ndarray           # C × k feature-map row of the spatial maximum
    x: np.ndarray           # C × k feature-map column
    fmap: np.ndarray        # [C, H, W]
    rf: np.ndarray          # [size_h, size_w, jump_h, jump_w, start_h, start_w]
    maps: np.ndarray | None  # C × k × h × w activation maps (small feature maps only)

    @property
    def channels(self) -> int:
        """Number of neurons (channels) of the layer."""
        return int(self.fmap[0])


def read_activations(path: str | Path, layers: Iterable[str] | None = None
                     ) -> tuple[list[str], tuple[int, int], dict[str, LayerTopK]]:
    """Read 01_activations.npz → (layer names in model order, input size (H, W), layers by name).

    Only the arrays of ``layers`` are loaded (all layers when None; ``()`` reads just the names
    and the input size): the file is opened lazily, member by member.
    """
    with _open_activations(path) as data:
        names = [str(name) for name in data["layers"]]
        if "input_size" not in data.files:
            raise StageError(f"{path} has no 'input_size' array: it comes from an older 01_extract; "
                             "re-run 01_extract")
        input_size = tuple(int(v) for v in data["input_size"])
        wanted = names if layers is None else list(layers)
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise StageError(f"layers {unknown} are not in {path}; it has {names}")
        by_name = {
            name: LayerTopK(name=name, values=data[f"{name}/values"],
                            image_ids=data[f"{name}/image_ids"], y=data[f"{name}/y"],
                            x=data[f"{name}/x"], fmap=data[f"{name}/fmap"], rf=data[f"{name}/rf"],
                            maps=data[f"{name}/maps"] if f"{name}/maps" in data.files else None)
            for name in wanted}
    return names, input_size, by_name


def read_layer_order(path: str | Path) -> list[str]:
    """The model's layer order: the ``layers`` array of 01_activations.npz (nothing else is read)."""
    with _open_activations(path) as data:
        return [str(name) for name in data["layers"]]


def _open_activations(path: str | Path):
    """01_activations.npz opened lazily (a context manager), checked to hold a ``layers`` array."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} not found: run 01_extract first")
    data = np.load(path, allow_pickle=False)
    if "layers" not in data.files:
        data.close()
        raise StageError(f"{path} has no 'layers' array: is it an 01_activations.npz?")
    return data


def order_layers(found: Iterable[str], model_order: list[str]) -> list[str]:
    """The distinct names of ``found`` sorted by ``model_order``; names it lacks come last, in
    their order of first appearance."""
    rank = {name: i for i, name in enumerate(model_order)}
    first = {name: i for i, name in enumerate(dict.fromkeys(found))}
    return sorted(first, key=lambda name: (rank.get(name, len(rank)), first[name]))


def read_stats(stats_dir: str | Path, layer: str, agg: str) -> np.ndarray:
    """``agg`` (``max`` or ``mean``) of every channel of ``layer`` per image from 01_stats:
    N_images × C float32, memory-mapped (only the rows used are read from disk)."""
    path = Path(stats_dir) / f"{layer}.{agg}.npy"
    if not path.exists():
        raise StageError(f"{path} not found: 01_stats is incomplete; re-run 01_extract")
    return np.load(path, mmap_mode="r")


# ---------------------------------------------------------------------------------------------
# 02_mosaics


@dataclass(frozen=True)
class Mosaic:
    """A row of 02_mosaics.csv; ``grid`` is the number of tiles per side. The file holds ``path``
    relative to its folder; ``read_mosaics`` resolves it. ``ranks`` (optional column, only in
    indices of mosaics made from part of a neuron's crops, such as 09's sub-concepts named
    ``<layer>#<s>``): the places of the tiles, best first, in the top-k list of the neuron
    ``layer`` (without ``#<s>``), ``channel``; empty when tile i is the neuron's i-th top image."""
    layer: str
    channel: int
    path: Path
    n_tiles: int
    grid: int
    tile_px: int
    crop: str
    ranks: tuple[int, ...] = ()

    @property
    def source_layer(self) -> str:
        """The real layer whose neuron the tiles come from (``layer`` without ``#<s>`` when
        ``ranks`` is given)."""
        return self.layer.rsplit("#", 1)[0] if self.ranks else self.layer

    @property
    def key(self) -> tuple[str, int]:
        """(layer, channel): the neuron."""
        return self.layer, self.channel

    def tiles(self, limit: int | None = None) -> list[np.ndarray]:
        """The first ``limit`` crops (default: all ``n_tiles``), best first, as uint8 RGB arrays."""
        n = self.n_tiles if limit is None else min(limit, self.n_tiles)
        return cut_tiles(load_mosaic(self.path), self.grid, self.tile_px, n)


def read_mosaics(path: str | Path, required: bool = True) -> list[Mosaic]:
    """Every row of 02_mosaics.csv (``required=False``: a missing file gives [] and a warning)."""
    path = Path(path)
    return [dataclasses.replace(m, path=path.parent / m.path)
            for m in _read_rows(path, Mosaic, "02_mosaics", required)]


# ---------------------------------------------------------------------------------------------
# 03_describe


@dataclass(frozen=True)
class Description:
    """A row of 03_descriptions.csv; ``description`` is empty when ``status`` is ``failed``."""
    layer: str
    channel: int
    level: int
    description: str
    backend: str
    model: str
    status: str
    reason: str

    @property
    def key(self) -> tuple[str, int]:
        """(layer, channel): the neuron."""
        return self.layer, self.channel

    @property
    def ok(self) -> bool:
        """True for a successful, non-empty description."""
        return self.status == "ok" and bool(self.description.strip())


def read_descriptions(path: str | Path, required: bool = True) -> list[Description]:
    """Every row of 03_descriptions.csv (``required=False``: a missing file gives [] and a warning)."""
    return _read_rows(path, Description, "03_describe", required)


def description_texts(rows: Iterable[Description]) -> dict[tuple[str, int], str]:
    """``(layer, channel) → description`` for showing neurons: a failed row gives "" (and never
    hides a successful row of the same neuron)."""
    out: dict[tuple[str, int], str] = {}
    for row in rows:
        text = row.description if row.ok else ""
        if text or row.key not in out:
            out[row.key] = text
    return out


# ---------------------------------------------------------------------------------------------
# 04_embed


@dataclass
class Embeddings:
    """04_embeddings.npz: one row per described neuron, each vector array L2-normalised."""
    layer: np.ndarray      # (N,) str
    channel: np.ndarray    # (N,) int64
    text: np.ndarray       # (N, Dt) float32
    image: np.ndarray | None  # (N, Di) float32, None when 04 stored no image vectors
    fused: np.ndarray      # (N, Df) float32
    text_model: str
    image_model: str
    fusion: str            # mean or concat

    def keys(self) -> list[tuple[str, int]]:
        """(layer, channel) of every row, in row order."""
        return list(zip(self.layer.tolist(), self.channel.tolist()))


def read_embeddings(path: str | Path) -> Embeddings:
    """Read 04_embeddings.npz; an empty ``image`` array (no image embedder) reads as None."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} not found: run 04_embed first")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("layer", "channel", "text", "fused") if k not in data.files]
        if missing:
            raise StageError(f"{path} has no {missing} arrays: re-run 04_embed")
        image = data["image"] if "image" in data.files else None
        if image is not None and (image.ndim != 2 or image.shape[1] == 0):
            image = None
        text_data = {k: str(data[k]) if k in data.files else ""
                     for k in ("text_model", "image_model", "fusion")}
        return Embeddings(layer=data["layer"].astype(str),
                          channel=data["channel"].astype(np.int64),
                          text=np.asarray(data["text"], np.float32),
                          image=None if image is None else np.asarray(image, np.float32),
                          fused=np.asarray(data["fused"], np.float32), **text_data)


def write_embeddings(path: str | Path, emb: Embeddings) -> dict[str, np.ndarray]:
    """Write 04_embeddings.npz atomically; returns the arrays written."""
    arrays = {"layer": np.asarray(emb.layer, dtype=str),
              "channel": np.asarray(emb.channel, np.int64),
              "text": np.asarray(emb.text, np.float32),
              "image": np.asarray(emb.image if emb.image is not None
                                  else np.zeros((len(emb.layer), 0)), np.float32),
              "fused": np.asarray(emb.fused, np.float32),
              "text_model": np.array(emb.text_model), "image_model": np.array(emb.image_model),
              "fusion": np.array(emb.fusion)}
    save_npz(path, arrays)
    return arrays


class CropVectors:
    """04_crops.npz: the image embedder's vector of each of every neuron's top crops, each
    distinct crop stored once.

    Arrays: ``layer`` (str, N), ``channel`` (int64, N), ``index`` (int64, N × K: row of ``vectors``
    of the neuron's k-th best crop, −1 past its last crop), ``vectors`` (float32, U × dim, unit
    rows), ``embedder`` and ``space`` (0-d str: the image embedder's name and space).
    """

    def __init__(self, arrays: dict):
        """Wrap the arrays of a crop-vectors file (see the class docstring)."""
        self.arrays = arrays
        self.embedder = str(arrays["embedder"])
        self.space = str(arrays["space"])
        self.max_crops = int(arrays["index"].shape[1])
        self._row = {(str(layer), int(ch)): i
                     for i, (layer, ch) in enumerate(zip(arrays["layer"], arrays["channel"]))}

    @classmethod
    def build(cls, keys: list[tuple[str, int]], counts: list[int], vectors: np.ndarray,
              rows: np.ndarray, embedder: str, space: str) -> "CropVectors":
        """From ``common.embedders.embed_distinct_crops`` over the neurons' crops laid end to end:
        ``keys`` (layer, channel) and ``counts`` (crops of each neuron, in that order)."""
        index = np.full((len(keys), max(counts, default=0)), -1, np.int64)
        start = 0
        for i, count in enumerate(counts):
            index[i, :count] = rows[start:start + count]
            start += count
        return cls({"layer": np.array([k[0] for k in keys], dtype=str),
                    "channel": np.array([int(k[1]) for k in keys], np.int64), "index": index,
                    "vectors": np.asarray(vectors, np.float32), "embedder": np.array(embedder),
                    "space": np.array(space)})

    def of(self, layer: str, channel: int) -> np.ndarray:
        """The neuron's crop vectors, best crop first (0 × dim when it has none)."""
        i = self._row.get((layer, int(channel)))
        if i is None:
            return np.zeros((0, self.arrays["vectors"].shape[1]), np.float32)
        index = self.arrays["index"][i]
        return self.arrays["vectors"][index[index >= 0]]


def read_crop_vectors(path: str | Path) -> CropVectors:
    """Read 04_crops.npz, refusing a file without the expected arrays."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} not found: run 04_embed first")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    missing = {"layer", "channel", "index", "vectors", "embedder", "space"} - set(arrays)
    if missing:
        raise StageError(f"{path} lacks {sorted(missing)}: it comes from an older 04; re-run "
                         f"04_embed.py (make all)")
    return CropVectors(arrays)


def write_crop_vectors(path: str | Path, crops: CropVectors) -> None:
    """Write 04_crops.npz atomically."""
    save_npz(path, crops.arrays)


# ---------------------------------------------------------------------------------------------
# 05_cluster, 06_trace


@dataclass(frozen=True)
class ClusterRow:
    """A row of 05_clusters.csv: a neuron's cluster and 2-D map position for one embedding kind."""
    layer: str
    channel: int
    kind: str
    cluster: int
    x: float
    y: float


def read_clusters(path: str | Path) -> list[ClusterRow]:
    """Every row of 05_clusters.csv."""
    return _read_rows(path, ClusterRow, "05_cluster")


@dataclass(frozen=True)
class MetricRow:
    """A row of 05_metrics.csv; silhouette and Davies–Bouldin are NaN when k = 1. ``wins``: of
    the three metrics (cohesion and silhouette higher, Davies–Bouldin lower), on how many this
    kind beats the layer's other kind; ``better``: the kind that wins at least two ("text" or
    "fused"), or "tie" — the same on both rows of a layer."""
    layer: str
    kind: str
    k: int
    cohesion: float
    silhouette: float
    davies_bouldin: float
    ari_text_fused: float
    wins: int
    better: str


def read_metrics(path: str | Path) -> list[MetricRow]:
    """Every row of 05_metrics.csv."""
    return _read_rows(path, MetricRow, "05_cluster")


@dataclass(frozen=True)
class KSearchRow:
    """A row of 05_ksearch.csv: one k fitted by the search."""
    layer: str
    kind: str
    k: int
    silhouette: float
    inertia: float
    chosen: int


def read_ksearch(path: str | Path) -> list[KSearchRow]:
    """Every row of 05_ksearch.csv."""
    return _read_rows(path, KSearchRow, "05_cluster")


@dataclass(frozen=True)
class KeywordRow:
    """A row of 05_keywords.csv; ``cluster`` None (``all`` in the file) is the whole layer."""
    layer: str
    kind: str
    cluster: int | None
    rank: int
    term: str
    weight: float


def read_keywords(path: str | Path) -> list[KeywordRow]:
    """Every row of 05_keywords.csv."""
    return _read_rows(path, KeywordRow, "05_cluster")


@dataclass(frozen=True)
class CategoryRow:
    """A row of 05_categories.csv: a neuron's concept category and how it was assigned."""
    layer: str
    channel: int
    category: str
    score: float
    method: str


def read_categories(path: str | Path) -> list[CategoryRow]:
    """Every row of 05_categories.csv."""
    return _read_rows(path, CategoryRow, "05_cluster")


@dataclass(frozen=True)
class TraceLink:
    """A row of 06_trace.csv: a cluster's best match in the next layer, by its sentences' keywords
    (``kind`` sentence: ``similarity`` is their cosine) or by the network's connections (``kind``
    connection: ``similarity`` is the normalised connection strength, 1 = as strong as the layer
    pair's average, and ``p_value`` how often random clusters of the same sizes do as well;
    ``06_trace.connection_links``; NaN for sentence links). Files made before the column:
    sentence."""
    source_layer: str
    source_cluster: int
    source_keywords: str
    target_layer: str
    target_cluster: int
    target_keywords: str
    similarity: float
    kind: str = "sentence"
    p_value: float = math.nan


def read_trace(path: str | Path) -> list[TraceLink]:
    """Every row of 06_trace.csv."""
    return _read_rows(path, TraceLink, "06_trace")


@dataclass
class Connections:
    """06_connections.npz: how much each neuron of a chosen layer drives each neuron of the next
    chosen layer (activation × gradient, ``common.attribution.connection_strengths``), averaged
    over ``n_images`` sampled images. ``layers`` are the chosen layers in depth order; the
    matrix of ``layers[k]`` (channels × channels of ``layers[k + 1]``) is ``to_next[layers[k]]``.
    Empty (no layers) when 06 computed none; its meta says why."""
    layers: list[str]
    to_next: dict[str, np.ndarray]   # source layer → C_source × C_next float32
    n_images: int
    aggregate: str                   # how the later neuron's map is reduced: mean or max

    def pair(self, source: str) -> tuple[str, np.ndarray] | None:
        """``(next layer, matrix)`` of ``source``, None when it has no next layer here."""
        if source not in self.to_next:
            return None
        return self.layers[self.layers.index(source) + 1], self.to_next[source]

    def strongest(self, layer: str, channel: int, n: int) -> dict[str, list[tuple[str, int, float]]]:
        """The ``n`` strongest inputs (from the layer before) and outputs (to the layer after) of
        one neuron, by |strength|, as ``(layer, channel, strength)``; signed: negative holds the
        other neuron back. Keys ``inputs`` and ``outputs``; a list is empty at either end."""
        out: dict[str, list] = {"inputs": [], "outputs": []}
        if layer not in self.layers:
            return out
        k = self.layers.index(layer)
        if k > 0:
            column = self.to_next[self.layers[k - 1]][:, channel]
            out["inputs"] = _ranked(self.layers[k - 1], column, n)
        if layer in self.to_next:
            out["outputs"] = _ranked(self.layers[k + 1], self.to_next[layer][channel], n)
        return out


def _ranked(layer: str, values: np.ndarray, n: int) -> list[tuple[str, int, float]]:
    """The ``n`` entries of ``values`` largest in absolute value, as ``(layer, index, value)``."""
    order = np.argsort(-np.abs(values), kind="stable")[:n]
    return [(layer, int(i), float(values[i])) for i in order if values[i] != 0]


def write_connections(path: str | Path, layers: list[str], to_next: dict[str, np.ndarray],
                      n_images: int, aggregate: str) -> None:
    """Write 06_connections.npz (see ``Connections``); ``layers`` without matrices: empty."""
    arrays = {"layers": np.array(layers if to_next else [], dtype=str),
              "n_images": np.array(n_images), "aggregate": np.array(aggregate)}
    for source, matrix in to_next.items():
        arrays[f"{source}/to_next"] = np.asarray(matrix, np.float32)
    save_npz(path, arrays)


def read_connections(path: str | Path) -> Connections | None:
    """06_connections.npz, None when the file is absent."""
    if not Path(path).is_file():
        return None
    data = load_npz(path)
    layers = [str(v) for v in data["layers"]]
    return Connections(layers=layers, to_next={L: data[f"{L}/to_next"] for L in layers[:-1]},
                       n_images=int(data["n_images"]), aggregate=str(data["aggregate"]))


# ---------------------------------------------------------------------------------------------
# 08_debug: the confusion table, and per analysed pair (true class T predicted as P) its folder


@dataclass(frozen=True)
class ConfusionRow:
    """A row of 08_confusion.csv: one labelled class, rank 1 = most errors; ``top1_pred_idx`` is
    None and ``top1_share`` NaN for a class without errors."""
    rank: int
    class_idx: int
    class_: str = dataclasses.field(metadata={"column": "class"})
    n: int
    correct: int
    errors: int
    accuracy: float
    top1_pred_idx: int | None
    top1_pred: str
    top1_count: int
    top1_share: float
    top_confused: str


@dataclass(frozen=True)
class PairRow:
    """A row of 08_debug/pairs.csv: one confusion pair and why it was or was not analysed.

    ``status`` is ``selected``, ``fallback`` or ``requested`` (analysed: its report is in
    ``folder``) or ``skipped``; ``share`` is KO over all errors of the true class."""
    true_idx: int
    true: str
    pred_idx: int
    pred: str
    n_true: int
    ok: int
    ko: int
    share: float
    status: str
    reason: str
    folder: str

    @property
    def analysed(self) -> bool:
        """True when 08 analysed the pair (its folder holds neurons.csv and the reports)."""
        return self.status in ANALYSED and bool(self.folder)


ANALYSED = ("selected", "fallback", "requested")  # statuses of pairs.csv that have a folder


@dataclass(frozen=True)
class DebugNeuron:
    """A row of 08_debug/<pair>/neurons.csv: one neuron, ranked by |z| (see 08's --rank-by), with
    the statistics of common/differential.py for the per-image max (``max_``) and mean
    (``mean_``): ``sigma`` the pooled standard deviation, ``z`` = Δμ / sigma (the thesis's z),
    ``t`` the Student two-sample statistic, ``p`` Welch's p-value, ``q`` its Benjamini–Hochberg
    q-value; the flags (``flag_z``: |z| ≥ the rule; ``flag_fdr``: q ≤ FDR) are 0 or 1."""
    rank: int
    layer: str
    channel: int
    max_mu_ok: float
    max_mu_ko: float
    max_delta_mu: float
    max_sigma: float
    max_z: float
    max_t: float
    max_p: float
    max_q: float
    max_flag_z: int
    max_flag_fdr: int
    mean_mu_ok: float
    mean_mu_ko: float
    mean_delta_mu: float
    mean_sigma: float
    mean_z: float
    mean_t: float
    mean_p: float
    mean_q: float
    mean_flag_z: int
    mean_flag_fdr: int
    description: str
    mosaic: str


@dataclass(frozen=True)
class AblationRow:
    """A row of 08_debug/<pair>/ablation.csv: one image of the causal check. ``group`` is KO, OK
    or sample; predictions are class indices (01's, the re-run's, with the suspects zeroed, with
    the random control zeroed: None where the control was not run); ``p_true_*`` the true
    class's probability before and after."""
    image_id: int
    group: str
    label_idx: int
    pred_01: int
    pred_base: int
    pred_ablated: int
    pred_control: int | None
    p_true_base: float
    p_true_ablated: float


def _renamed(row_type) -> dict[str, str]:
    """Field → CSV column, for fields whose column is no valid Python name (``class``)."""
    return {f.name: f.metadata["column"] for f in dataclasses.fields(row_type)
            if "column" in f.metadata}


def csv_columns(row_type) -> list[str]:
    """The CSV header of a row dataclass (``columns`` with renamed fields under their column)."""
    renamed = _renamed(row_type)
    return [renamed.get(name, name) for name in columns(row_type)]


def _write_rows(path: str | Path, row_type, rows: Iterable[dict]) -> None:
    """Write dict rows keyed by column name as the contract file of ``row_type`` (its columns,
    in its order), atomically."""
    write_csv(path, rows, csv_columns(row_type))


def read_confusion(path: str | Path) -> list[ConfusionRow]:
    """Every row of 08_confusion.csv (the ``class`` column is the field ``class_``)."""
    return _read_rows(path, ConfusionRow, "08_debug", renamed=_renamed(ConfusionRow))


def write_confusion(path: str | Path, rows: Iterable[dict]) -> None:
    """Write 08_confusion.csv from dict rows keyed by column (``class``, not ``class_``)."""
    _write_rows(path, ConfusionRow, rows)


def read_pairs(path: str | Path) -> list[PairRow]:
    """Every row of 08_debug/pairs.csv."""
    return _read_rows(path, PairRow, "08_debug")


def write_pairs(path: str | Path, rows: Iterable[dict]) -> None:
    """Write 08_debug/pairs.csv from dict rows keyed by column."""
    _write_rows(path, PairRow, rows)


def read_debug_neurons(path: str | Path) -> list[DebugNeuron]:
    """Every row of an 08_debug/<pair>/neurons.csv, in rank order."""
    return _read_rows(path, DebugNeuron, "08_debug")


def write_debug_neurons(path: str | Path, rows: Iterable[dict]) -> None:
    """Write an 08_debug/<pair>/neurons.csv from dict rows keyed by column."""
    _write_rows(path, DebugNeuron, rows)


def read_ablation(path: str | Path) -> list[AblationRow]:
    """Every row of an 08_debug/<pair>/ablation.csv."""
    return _read_rows(path, AblationRow, "08_debug")


def write_ablation(path: str | Path, rows: Iterable[dict]) -> None:
    """Write an 08_debug/<pair>/ablation.csv from dict rows keyed by column."""
    _write_rows(path, AblationRow, rows)


def read_pair_record(folder: str | Path) -> dict:
    """``pair.json`` of an 08 pair folder: ``{"pair": its pairs.csv row, "upstream": {stage:
    fingerprint}}`` (the lineage of the inputs the folder was made from)."""
    return read_json(PairFolder(folder).record)


def read_causal(folder: str | Path) -> dict | None:
    """``causal.json`` of an 08 pair folder (the causal check's summary), None when the check was
    not run for the pair."""
    path = PairFolder(folder).causal
    return read_json(path) if path.exists() else None


@dataclass
class Attributions:
    """08_debug/attributions.npz: the relevance (activation × gradient, common/attribution.py)
    of every neuron of the run's layers to the wrong (predicted) and the right (true) class of
    the misclassified images of the analysed pairs — the first ``max_images`` of each pair, by
    image id; an unreadable image has no row."""
    layers: list[str]
    image_ids: np.ndarray      # n, int64
    wrong: dict[str, np.ndarray]  # layer → n × C float32
    right: dict[str, np.ndarray]  # layer → n × C float32
    logit_wrong: np.ndarray    # n, float32
    logit_right: np.ndarray    # n, float32
    max_images: int            # images attributed per pair at most

    def of(self, image_id: int) -> dict | None:
        """One image's relevances and logits (``attribute_images``' record), None if absent."""
        rows = np.flatnonzero(self.image_ids == image_id)
        if not len(rows):
            return None
        r = int(rows[0])
        return {"wrong": {L: self.wrong[L][r] for L in self.layers},
                "right": {L: self.right[L][r] for L in self.layers},
                "logit_wrong": float(self.logit_wrong[r]),
                "logit_right": float(self.logit_right[r])}


def write_attributions(path: str | Path, layers: list[str], records: dict[int, dict],
                       max_images: int) -> None:
    """Write 08_debug/attributions.npz from ``attribute_images``' records (image id order)."""
    ids = sorted(records)
    arrays = {"layers": np.array(layers), "image_ids": np.array(ids, np.int64),
              "max_images": np.array(max_images),
              "logit_wrong": np.array([records[i]["logit_wrong"] for i in ids], np.float32),
              "logit_right": np.array([records[i]["logit_right"] for i in ids], np.float32)}
    for layer in layers:
        for side in ("wrong", "right"):
            arrays[f"{layer}/{side}"] = np.array([records[i][side][layer] for i in ids],
                                                 np.float32).reshape(len(ids), -1)
    save_npz(path, arrays)


def read_attributions(path: str | Path) -> Attributions | None:
    """08_debug/attributions.npz, or None when 08 computed none (no model, or no pair)."""
    if not Path(path).is_file():
        return None
    data = load_npz(path)
    layers = [str(v) for v in data["layers"]]
    return Attributions(layers=layers, image_ids=data["image_ids"],
                        wrong={L: data[f"{L}/wrong"] for L in layers},
                        right={L: data[f"{L}/right"] for L in layers},
                        logit_wrong=data["logit_wrong"], logit_right=data["logit_right"],
                        max_images=int(data["max_images"]))


@dataclass
class Why:
    """08_debug/<pair>/why.npz: for each misclassified image 08 attributed (ids as in
    attributions.npz), the neurons of all layers ranked together by their share of the push from
    the true to the predicted class (common.attribution.rank_contributions), with each one's
    activation map on the image. Row i, rank k: ``layer[i, k]`` (−1: fewer neurons than ranks;
    an index into ``layers``), ``channel``, ``share`` (−1 … 1), ``relevance`` (its activation ×
    gradient of logit_pred − logit_true) and ``maps[i, k]`` (MAP_SIDE × MAP_SIDE, the layer's
    activation grid resampled over the whole image)."""
    layers: list[str]
    image_ids: np.ndarray   # n, int64
    layer: np.ndarray       # n × K, int16 (−1: empty rank)
    channel: np.ndarray     # n × K, int32
    share: np.ndarray       # n × K, float32
    relevance: np.ndarray   # n × K, float32
    maps: np.ndarray        # n × K × S × S, float16

    def of(self, image_id: int) -> list[dict]:
        """One image's ranked neurons: dicts of layer, channel, share, relevance and map (S × S
        float32); [] when the image was not attributed."""
        rows = np.flatnonzero(self.image_ids == image_id)
        if not len(rows):
            return []
        r = int(rows[0])
        return [{"layer": self.layers[int(L)], "channel": int(self.channel[r, k]),
                 "share": float(self.share[r, k]), "relevance": float(self.relevance[r, k]),
                 "map": self.maps[r, k].astype(np.float32)}
                for k, L in enumerate(self.layer[r]) if L >= 0]


def write_why(path: str | Path, layers: list[str], records: dict[int, dict]) -> None:
    """Write 08_debug/<pair>/why.npz from ``attribute_images(..., top=K)``'s records of the
    pair's images (each with ``top`` and ``maps``), in image id order."""
    ids = sorted(records)
    k = max([len(records[i]["top"]) for i in ids] + [0])
    side = max([records[i]["maps"].shape[-1] for i in ids] + [1])
    layer = np.full((len(ids), k), -1, np.int16)
    channel = np.zeros((len(ids), k), np.int32)
    share = np.zeros((len(ids), k), np.float32)
    relevance = np.zeros((len(ids), k), np.float32)
    maps = np.zeros((len(ids), k, side, side), np.float16)
    for r, i in enumerate(ids):
        for j, (name, c, sh, rel) in enumerate(records[i]["top"]):
            layer[r, j], channel[r, j], share[r, j], relevance[r, j] = layers.index(name), c, sh, rel
            maps[r, j] = records[i]["maps"][j]
    save_npz(path, {"layers": np.array(layers), "image_ids": np.array(ids, np.int64),
                    "layer": layer, "channel": channel, "share": share, "relevance": relevance,
                    "maps": maps})


def read_why(path: str | Path) -> Why | None:
    """08_debug/<pair>/why.npz, or None when 08 ranked no image of the pair (no model run)."""
    if not Path(path).is_file():
        return None
    data = load_npz(path)
    return Why(layers=[str(v) for v in data["layers"]], image_ids=data["image_ids"],
               layer=data["layer"], channel=data["channel"], share=data["share"],
               relevance=data["relevance"], maps=data["maps"])


def write_report_blocks(path: str | Path, blocks: list[dict]) -> None:
    """Write 08_debug/<pair>/report.json: a report's common/render.py blocks as JSON, image paths
    relative to the file's folder (the atlas renders its own copy with links from them)."""
    from common.io import write_json
    folder = Path(path).parent

    def plain(value):
        """A block value as JSON: paths relative to ``folder``, sets as sorted lists."""
        if isinstance(value, Path):
            return {"path": Path(os.path.relpath(os.path.abspath(value), os.path.abspath(folder))).as_posix()}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        return value
    write_json(path, {"blocks": plain(blocks)})


def read_report_blocks(path: str | Path) -> list[dict] | None:
    """08_debug/<pair>/report.json as render blocks (image paths absolute again; ``numeric``
    back as a set); None when absent (a report written before 08 stored its blocks)."""
    if not Path(path).is_file():
        return None
    folder = Path(path).parent

    def back(value):
        """Undo ``write_report_blocks``' ``plain``."""
        if isinstance(value, dict):
            if set(value) == {"path"}:
                return folder / value["path"]
            return {k: back(v) for k, v in value.items()}
        if isinstance(value, list):
            return [back(v) for v in value]
        return value
    blocks = back(read_json(path)["blocks"])
    for b in blocks:
        if "numeric" in b:
            b["numeric"] = set(b["numeric"])
    return blocks


# ---------------------------------------------------------------------------------------------
# 09_score


@dataclass(frozen=True)
class ScoreRow:
    """A row of 09_scores.csv: a neuron (``subconcept`` None) or one of its sub-concepts (1, 2, 3;
    then ``description`` and ``mosaic``, relative to the run folder, are the sub-concept's). An
    empty numeric cell (not computable) reads as NaN or None; ARTEFACTS.md defines each column.
    Held-out figures are measured on the test half of the held-out images."""
    layer: str
    channel: int
    subconcept: int | None
    share: float
    selectivity: float
    dnr_score: float
    dead: int | None
    clarity: float
    polysemanticity: float
    redundancy: float
    embedder: str
    description: str
    mosaic: str
    matcher: str
    verify_corr: float
    verify_auprc: float
    control_corr: float
    control_auprc: float
    n_crops: int | None
    n_held_out: int | None
    n_positives: int | None
    control_channel: int | None
    # Issue 21's columns (absent from older files): SIEVE's selection, clusters and Activation
    # Rate, the margin over the control with its bootstrap interval, DnR's semantic consistency
    selected: int | None = None
    crop_clusters: int | None = None
    margin: float = math.nan
    margin_low: float = math.nan
    margin_high: float = math.nan
    verdict: str = ""
    control_description: str = ""
    activation_rate: float = math.nan
    ar_kept: int | None = None
    dnr_consistency: float = math.nan
    # Refinement's columns (absent from older files): the sentence the neuron or sub-concept
    # started from (03's, or the sub-concept's first) and its r on the same test-half images;
    # ``description`` is then the chosen sentence (a neuron row's too)
    first_description: str = ""
    first_corr: float = math.nan

    @property
    def key(self) -> tuple[str, int]:
        """(layer, channel): the neuron."""
        return self.layer, self.channel

    def numbers(self) -> dict[str, float | None]:
        """Every numeric column but the neuron's address (file order), None where empty."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", "int | None") and f.name not in ("channel", "subconcept"):
                out[f.name] = None if value is None or math.isnan(value) else float(value)
        return out


def read_score_rows(path: str | Path) -> list[ScoreRow]:
    """Every row of 09_scores.csv, the sub-concept rows included, in file order."""
    return _read_rows(path, ScoreRow, "09_score")


SCORE_COLUMNS = ("verify_corr", "verify_auprc", "control_corr", "clarity", "polysemanticity",
                 "selectivity", "dnr_score", "dead", "margin", "margin_low", "margin_high",
                 "activation_rate", "dnr_consistency")  # the numbers of a neuron row of 09_scores.csv


def read_scores(path: str | Path) -> dict[tuple[str, int], dict[str, float | None]]:
    """``(layer, channel) → {verify_corr, clarity, …}`` from the neuron rows of 09_scores.csv.

    Empty cells (no score) become None. A missing file gives an empty mapping and a warning: the
    stages that show scores still work without them.
    """
    path = Path(path)
    if not path.exists():
        log.warning("%s not found: neurons are shown without their scores (run stage 09)", path)
        return {}
    return {row.key: {k: v for k, v in row.numbers().items() if k in SCORE_COLUMNS}
            for row in read_score_rows(path) if row.subconcept is None}


@dataclass(frozen=True)
class SummaryRow:
    """A row of 09_summary.csv: one layer's neuron count, dead neurons, mean scores and shares
    beating the control (NaN when no neuron of the layer has the score)."""
    layer: str
    neurons: int
    dead: int
    mean_selectivity: float
    mean_dnr: float
    mean_clarity: float
    mean_polysemanticity: float
    mean_redundancy: float
    mean_verify_corr: float
    mean_control_corr: float
    share_beating_control: float
    matcher: str
    embedder: str
    share_beating_control_auprc: float = math.nan  # later columns: absent from older files
    share_reliable: float = math.nan
    mean_margin: float = math.nan
    selected: int | None = None
    split: int | None = None
    hypotheses: int | None = None
    hypotheses_kept: int | None = None
    mean_ar: float = math.nan
    mean_ar_kept: float = math.nan
    mean_dnr_consistency: float = math.nan
    n_selection: int | None = None
    n_test: int | None = None
    mean_first_corr: float = math.nan
    distinct_first: int | None = None
    distinct_sentences: int | None = None


def read_summary(path: str | Path) -> list[SummaryRow]:
    """Every row of 09_summary.csv, in layer order."""
    return _read_rows(path, SummaryRow, "09_score")


@dataclass(frozen=True)
class CandidateRow:
    """A row of 09_candidates.csv: one candidate sentence of a neuron (``subconcept`` None) or of
    a sub-concept, in the order Describe-and-Refine's loop scored them. ``source``: sentence
    (03's), subconcept (a sub-concept's sentence), user (CONCEPTS) or refined (the describer's
    answer on the images the best sentence of the previous iteration missed); ``selection_corr``:
    its Pearson r on the selection half (NaN when too few images); ``chosen`` 1 for the one kept
    (the final sentence of 09_scores.csv)."""
    layer: str
    channel: int
    subconcept: int | None
    iteration: int
    source: str
    description: str
    selection_corr: float
    chosen: int

    @property
    def key(self) -> tuple[str, int]:
        """(layer, channel): the neuron."""
        return self.layer, self.channel


def read_candidates(path: str | Path, required: bool = True) -> list[CandidateRow]:
    """Every row of 09_candidates.csv, in file order (``required=False``: a missing file, as
    from a run before refinement, gives [] and a warning)."""
    return _read_rows(path, CandidateRow, "09_score", required)


# ---------------------------------------------------------------------------------------------
# The reports made on request: 11_baskets, 12_compare, 13_audit


@dataclass(frozen=True)
class BasketRow:
    """A row of 11_baskets.csv: a set of neurons of one layer tied to a group of images.

    ``method`` finch (the paper's): ``level`` (1 = finest) and ``cluster`` are the image
    cluster's place in the layer's FINCH partitions, ``parent`` the number of the basket of the
    next level holding it (−1: none kept). ``method`` corr: level 0, ``cluster`` and ``parent``
    are nodes of the linkage tree. ``consistency`` NaN for a single neuron; ``mosaic`` relative
    to the run folder."""
    basket: str
    layer: str
    number: int
    method: str
    level: int
    cluster: int
    parent: int
    size: int
    members: tuple[int, ...]
    n_images: int
    cohesion: float
    purity: float
    db_ratio: float
    consistency: float
    random_consistency: float
    top_images: tuple[int, ...]
    name: str
    mosaic: str
    description: str


def read_baskets(path: str | Path) -> list[BasketRow]:
    """Every row of 11_baskets.csv (layer by layer, by level, largest first)."""
    return _read_rows(path, BasketRow, "11_baskets (make baskets)")


def read_basket_tree(path: str | Path) -> dict[str, np.ndarray]:
    """11_tree.npz by array name: ``<layer>/partitions`` and ``<layer>/image_ids`` (finch) or
    ``<layer>/linkage`` and ``<layer>/correlation`` (corr)."""
    if not Path(path).is_file():
        raise StageError(f"{path} not found: build the baskets first (make baskets)")
    return load_npz(path)


@dataclass(frozen=True)
class ConsistencyRow:
    """A row of 11_consistency.csv (the paper's Table 1 for the run): a layer's (or ``all``)
    baskets of two neurons or more, their mean activation consistency and that of random-index
    sets of the same sizes, mean and std over the repeats."""
    layer: str
    n_baskets: int
    mean_size: float
    consistency: float
    consistency_sd: float
    random_index: float
    random_index_sd: float
    repeats: int


def read_consistency(path: str | Path) -> list[ConsistencyRow]:
    """Every row of 11_consistency.csv."""
    return _read_rows(path, ConsistencyRow, "11_baskets (make baskets)")


@dataclass(frozen=True)
class PruningRow:
    """A row of 11_pruning.csv (the paper's Table 2 for the run): a class y (``class_idx`` −1:
    all classes above), the baskets whose name mentions it (``pruned``), and the mean change of
    p(y|x) on its labelled images when one of them, a random other basket or a random-index set
    of the same size is zeroed: mean and std over the repeats (NaN: nothing to draw)."""
    class_idx: int
    class_name: str
    n_images: int
    n_baskets: int
    pruned: str
    p_before: float
    delta_basket: float
    delta_basket_sd: float
    delta_random_basket: float
    delta_random_basket_sd: float
    delta_random_index: float
    delta_random_index_sd: float
    repeats: int


def read_pruning(path: str | Path) -> list[PruningRow]:
    """Every row of 11_pruning.csv."""
    return _read_rows(path, PruningRow, "11_baskets (make baskets)")


@dataclass(frozen=True)
class MatchRow:
    """A row of 12_matches.csv: a neuron of run A (``side`` A) or B and its closest neuron of the
    other run by cosine; ``mutual`` 1 when each is the other's closest."""
    side: str
    layer: str
    channel: int
    match_layer: str
    match_channel: int
    cosine: float
    mutual: int
    description: str
    match_description: str


def read_matches(path: str | Path) -> list[MatchRow]:
    """Every row of 12_matches.csv."""
    return _read_rows(path, MatchRow, "12_compare (make compare)")


@dataclass(frozen=True)
class AlignmentRow:
    """A row of 12_alignment.csv: mean best-match cosine from a layer of A to one of B and back."""
    layer_a: str
    layer_b: str
    a_to_b: float
    b_to_a: float


def read_alignment(path: str | Path) -> list[AlignmentRow]:
    """Every row of 12_alignment.csv (A's layers in model order, B's within each)."""
    return _read_rows(path, AlignmentRow, "12_compare (make compare)")


@dataclass(frozen=True)
class ConceptMatchRow:
    """A row of 12_concepts.csv: a 05 cluster of one run, its closest cluster of the other run by
    centroid cosine, and whether that is close enough to count as a counterpart."""
    side: str
    layer: str
    cluster: int
    size: int
    match_layer: str
    match_cluster: int
    cosine: float
    counterpart: int
    keywords: str
    example: str


def read_concept_matches(path: str | Path) -> list[ConceptMatchRow]:
    """Every row of 12_concepts.csv."""
    return _read_rows(path, ConceptMatchRow, "12_compare (make compare)")


@dataclass(frozen=True)
class CompareScoreRow:
    """A row of 12_scores.csv: 09's summary of one layer of one of the two runs (``run``: its
    folder name)."""
    run: str
    layer: str
    neurons: int
    dead: int
    mean_selectivity: float
    mean_clarity: float
    mean_polysemanticity: float
    mean_redundancy: float
    mean_verify_corr: float
    mean_control_corr: float
    share_beating_control: float


def read_compare_scores(path: str | Path) -> list[CompareScoreRow]:
    """Every row of 12_scores.csv (empty when neither run has 09's summary)."""
    return _read_rows(path, CompareScoreRow, "12_compare (make compare)")


@dataclass(frozen=True)
class AuditRow:
    """A row of 13_audit/audit.csv: one neuron of the audited layer for one class — its relevance
    and rank for the class, its label (valid, spurious, both, unexpected) and best alignments."""
    class_name: str
    class_idx: int
    layer: str
    channel: int
    relevance: float
    rank: int
    label: str
    valid_alignment: float
    valid_concept: str
    spurious_alignment: float
    spurious_concept: str
    description: str


def read_audit(path: str | Path) -> list[AuditRow]:
    """Every row of 13_audit/audit.csv."""
    return _read_rows(path, AuditRow, "13_audit (make audit)")


@dataclass(frozen=True)
class AuditSummaryRow:
    """A row of 13_audit/summary.csv: one audited class — labels of its ``top`` most relevant
    neurons, shares of its relevance, and the causal check (NaN / empty when not run)."""
    class_name: str
    class_idx: int
    layer: str
    n_images: int
    top: int
    n_valid: int
    n_spurious: int
    n_both: int
    n_unexpected: int
    n_undescribed: int
    spurious_share: float
    valid_share: float
    unexpected_share: float
    zeroed: tuple[int, ...]
    accuracy_before: float
    accuracy_zeroed: float
    accuracy_control: float
    confusions_before: str
    confusions_zeroed: str
    confusions_control: str
    controls: str
    accuracy_control_sd: float = math.nan  # std over the random sets (absent before issue 22)


def read_audit_summary(path: str | Path) -> list[AuditSummaryRow]:
    """Every row of 13_audit/summary.csv."""
    return _read_rows(path, AuditSummaryRow, "13_audit (make audit)")


@dataclass(frozen=True)
class RelianceRow:
    """A row of 13_audit/reliance.csv: one spurious concept of one audited class — how many of the
    class's usable images show it (``n_with``) and do not (``n_without``) by the concept matcher
    (``matcher``), and the model's reliance on it: the AUC of the class's logit separating the two
    groups (0.5: none) and the gap of their mean logits, before, with the class's spurious-aligned
    relevant neurons zeroed (``n_zeroed``), and with random sets of the same size zeroed (mean and
    std over the sets). ``status`` is ``ok`` or ``skipped`` (``reason`` says why); NaN where not
    measured."""
    class_name: str
    class_idx: int
    layer: str
    concept: str
    matcher: str
    n_with: int
    n_without: int
    status: str
    reason: str
    n_zeroed: int
    auc_before: float
    auc_zeroed: float
    auc_control: float
    auc_control_sd: float
    gap_before: float
    gap_zeroed: float
    gap_control: float
    gap_control_sd: float


def read_reliance(path: str | Path, required: bool = True) -> list[RelianceRow]:
    """Every row of 13_audit/reliance.csv (``required=False``: an audit made before it existed
    reads as none)."""
    return _read_rows(path, RelianceRow, "13_audit (make audit)", required=required)


@dataclass(frozen=True)
class DescriberNeuron:
    """A row of 14_describers/neurons.csv: one neuron described by two describers (``a`` and
    ``b``, named by their folders), each sentence's verify_corr and its control's (09's
    verification; NaN where not verified), and ``winner``: the name of the describer whose
    sentence verifies better, ``tie``, or empty when neither was verified."""
    layer: str
    channel: int
    describer_a: str
    describer_b: str
    sentence_a: str
    verify_corr_a: float
    control_corr_a: float
    sentence_b: str
    verify_corr_b: float
    control_corr_b: float
    winner: str


def read_describer_neurons(path: str | Path) -> list[DescriberNeuron]:
    """Every row of 14_describers/neurons.csv."""
    return _read_rows(path, DescriberNeuron, "14_describers (make describe-compare)")


@dataclass(frozen=True)
class DescriberSummary:
    """A row of 14_describers/summary.csv: one describer on one layer (``all``: every layer) —
    neurons, how many of its sentences were verified, their mean verify_corr and control_corr
    (NaN when none), the share beating their control, and its wins and the ties over the other
    describer."""
    layer: str
    describer: str
    neurons: int
    verified: int
    mean_verify_corr: float
    mean_control_corr: float
    share_beating_control: float
    wins: int
    ties: int


def read_describer_summary(path: str | Path) -> list[DescriberSummary]:
    """Every row of 14_describers/summary.csv."""
    return _read_rows(path, DescriberSummary, "14_describers (make describe-compare)")


@dataclass(frozen=True)
class LabelRow:
    """A row of 15_labels.csv: one neuron and its best concept of the list (SemanticLens's
    labelling): ``cosine`` with the concept, ``baseline`` (cosine with the empty text),
    ``score`` = cosine − baseline, ``margin`` = score − the threshold, ``labelled`` 1 when the
    score exceeds the threshold (``label`` is then the concept, else ``unlabelled``)."""
    layer: str
    channel: int
    label: str
    concept: str
    cosine: float
    baseline: float
    score: float
    margin: float
    labelled: int


def read_labels(path: str | Path) -> list[LabelRow]:
    """Every row of 15_labels.csv."""
    return _read_rows(path, LabelRow, "15_label (make label)")


@dataclass(frozen=True)
class LabelConceptRow:
    """A row of 15_concepts.csv: one concept in one layer — ``labelled``: the layer's neurons
    labelled with it; ``aligned``: those whose score with it exceeds the threshold; its best
    score in the layer and that neuron's channel; ``missing`` 1 when no neuron of the layer is
    aligned with it (a gap of the layer's knowledge)."""
    layer: str
    concept: str
    labelled: int
    aligned: int
    best_score: float
    best_channel: int
    missing: int


def read_label_concepts(path: str | Path) -> list[LabelConceptRow]:
    """Every row of 15_concepts.csv."""
    return _read_rows(path, LabelConceptRow, "15_label (make label)")
