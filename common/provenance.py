"""Provenance: the ``<stage>.meta.json`` written beside every stage's outputs, and the checks on it.

Each meta records the stage's arguments, library versions, a fingerprint of its outputs and a
*lineage*: the fingerprint of every upstream stage it was computed from. A stage that reads several
artefacts merges their lineages and refuses to go on when two of them disagree about an upstream
stage (for example descriptions made from the mosaics of another model or image set).
"""
from __future__ import annotations

import hashlib
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable, Mapping

from common.cli import StageError
from common.io import read_json, sha256_file, write_json

_PACKAGES = ("torch", "torchvision", "numpy", "pillow", "scikit-learn", "sentence-transformers",
             "transformers", "umap-learn")  # versions recorded in every meta


class ProvenanceError(StageError):
    """Inputs are missing their metadata or come from different upstream runs."""


def library_versions() -> dict[str, str]:
    """Versions of Python and of the installed libraries that can change results."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def meta_path_for(artefact: str | Path) -> Path:
    """The stage meta file that describes ``artefact``.

    Artefacts are named ``NN_…`` after the stage that wrote them, and that stage's meta is the
    single ``NN_*.meta.json`` in the same folder (``data/demo/01_activations.npz`` →
    ``data/demo/01_extract.meta.json``).
    """
    artefact = Path(artefact)
    prefix = artefact.name[:3]
    matches = sorted(artefact.parent.glob(f"{prefix}*.meta.json"))
    if len(matches) != 1:
        raise ProvenanceError(
            f"cannot find the metadata of {artefact} (expected one {prefix}*.meta.json beside it, "
            f"found {len(matches)}); re-run the stage that writes it")
    return matches[0]


def read_meta(artefact: str | Path) -> dict:
    """Read the meta of the stage that wrote ``artefact``."""
    return read_json(meta_path_for(artefact))


def merge_lineage(metas: Iterable[Mapping]) -> dict[str, str]:
    """Union of the lineages of ``metas``; raise if two disagree about the same stage."""
    merged: dict[str, str] = {}
    origin: dict[str, str] = {}
    for meta in metas:
        for stage, fingerprint in meta.get("lineage", {}).items():
            if stage in merged and merged[stage] != fingerprint:
                raise ProvenanceError(
                    f"inputs disagree about {stage}: {origin[stage]} was made from run "
                    f"{merged[stage]}, {meta.get('stage')} from run {fingerprint}. Re-run the "
                    f"stages after {stage} (e.g. `make all`) so that all inputs match")
            merged[stage] = fingerprint
            origin[stage] = meta.get("stage", "?")
    return merged


def fingerprint_files(paths: Iterable[str | Path]) -> str:
    """Short fingerprint of the bytes of ``paths`` (order-independent)."""
    digest = hashlib.sha256()
    for path in sorted(str(p) for p in paths):
        digest.update(Path(path).name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()[:16]


def write_meta(meta_file: str | Path, stage: str, args: Mapping, outputs: Iterable[str | Path],
               inputs: Iterable[Mapping] = (), **extra) -> dict:
    """Write ``meta_file`` for ``stage``: args, versions, output fingerprint and merged lineage.

    ``outputs`` are the files whose bytes define the stage's result; ``inputs`` are the metas of
    the artefacts it read. Returns the meta written.
    """
    lineage = merge_lineage(inputs)
    fingerprint = fingerprint_files(outputs)
    lineage[stage] = fingerprint
    meta = {
        "stage": stage,
        "args": {k: v for k, v in dict(args).items() if not callable(v)},
        "command": " ".join(sys.argv),
        "versions": library_versions(),
        "fingerprint": fingerprint,
        "lineage": lineage,
        **extra,
    }
    write_json(meta_file, meta)
    return meta
