"""Provenance: the ``<stage>.meta.json`` written beside every stage's outputs, and the checks on it.

Each meta records the stage's arguments, library versions, a fingerprint of its outputs and a
*lineage*: the fingerprint of every upstream stage it was computed from. A stage that reads several
artefacts merges their lineages and refuses to go on when two of them disagree about an upstream
stage (for example descriptions made from the mosaics of another model or image set).

The meta also lists the SHA-256 of every output file, and ``read_meta`` checks an artefact against
that list: a file from another run, one edited by hand, or one renamed into place by a stage that
was killed before writing its meta is refused. A stage removes its old meta before it replaces any
output (``retract_meta``) and writes the new one last, so that an interrupted stage always lacks
its meta — and Make, whose targets include the metas, runs it again.
"""
from __future__ import annotations

import hashlib
import os
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


def _relative(path: Path, meta_file: Path) -> str:
    """``path`` as named in the "files" list of ``meta_file`` (relative, forward slashes)."""
    return Path(os.path.relpath(path, meta_file.parent)).as_posix()


def read_meta(artefact: str | Path, meta_file: str | Path | None = None) -> dict:
    """Read the meta of the stage that wrote ``artefact``, after checking that ``artefact`` (a
    file, or a folder: every file in it) is byte for byte one of the outputs it lists.

    ``meta_file`` names the meta where the artefact's name does not lead to it (the files of
    13's audit folder); by default it is found by ``meta_path_for``. The returned dict carries
    ``_source`` (the artefact) so that lineage errors can name it.
    """
    artefact = Path(artefact)
    meta_file = Path(meta_file) if meta_file is not None else meta_path_for(artefact)
    if not meta_file.is_file():
        raise ProvenanceError(f"{artefact} has no {meta_file.name} beside it: the stage that "
                              f"writes them did not finish (stopped or killed); run it again")
    meta = read_json(meta_file)
    files = meta.get("files") or {}
    redo = (f"delete {meta_file} and run `make all` (or re-run {meta.get('stage', 'that stage')}"
            f") to rebuild it")
    checked = sorted(p for p in artefact.rglob("*") if p.is_file()) if artefact.is_dir() \
        else [artefact]
    if not checked:
        raise ProvenanceError(f"{artefact} is empty; {redo}")
    for path in checked:
        name = _relative(path, meta_file)
        if name not in files:
            raise ProvenanceError(f"{path} is not among the outputs that {meta_file} lists (it "
                                  f"comes from another run or an older version); {redo}")
        if sha256_file(path) != files[name]:
            raise ProvenanceError(f"{path} differs from what {meta.get('stage')} wrote (edited, "
                                  f"copied from another run, or its stage was interrupted); "
                                  f"{redo}")
    meta["_source"] = str(artefact)
    return meta


def retract_meta(meta_file: str | Path) -> None:
    """Remove a stage's meta before its outputs are replaced: until the new meta is written, the
    stage counts as not done (Make runs it again, later stages refuse its outputs)."""
    Path(meta_file).unlink(missing_ok=True)


def merge_lineage(metas: Iterable[Mapping]) -> dict[str, str]:
    """Union of the lineages of ``metas``; raise, naming the two runs, if two disagree about the
    same stage."""
    merged: dict[str, str] = {}
    origin: dict[str, str] = {}
    for meta in metas:
        source = meta.get("_source") or meta.get("stage", "?")
        for stage, fingerprint in meta.get("lineage", {}).items():
            if stage in merged and merged[stage] != fingerprint:
                raise ProvenanceError(
                    f"inputs come from two different runs of {stage}: {origin[stage]} was made "
                    f"from run {merged[stage]} of it, {source} from run {fingerprint}. Give inputs "
                    f"of one run folder, or re-run the stages after {stage} (e.g. `make all`) so "
                    f"that all inputs match")
            merged[stage] = fingerprint
            origin[stage] = source
    return merged


def fingerprint(hashes: Mapping[str, str]) -> str:
    """Short fingerprint of files given as {path: SHA-256} (order-independent)."""
    digest = hashlib.sha256()
    for path in sorted(hashes):
        digest.update(Path(path).name.encode())
        digest.update(hashes[path].encode())
    return digest.hexdigest()[:16]


def write_meta(meta_file: str | Path, stage: str, args: Mapping, outputs: Iterable[str | Path],
               inputs: Iterable[Mapping] = (), **extra) -> dict:
    """Write ``meta_file`` for ``stage``: args, versions, output fingerprint and merged lineage.

    ``outputs`` are the files whose bytes define the stage's result (each listed with its SHA-256
    for ``read_meta``'s check); ``inputs`` are the metas of the artefacts it read. Call it last,
    once every output is in place. Returns the meta written.
    """
    meta_file = Path(meta_file)
    lineage = merge_lineage(inputs)
    hashes = {str(p): sha256_file(p) for p in outputs}
    lineage[stage] = fingerprint(hashes)
    meta = {
        "stage": stage,
        "args": {k: v for k, v in dict(args).items() if not callable(v)},
        "command": " ".join(sys.argv),
        "versions": library_versions(),
        "fingerprint": lineage[stage],
        "files": {_relative(Path(p), meta_file): sha for p, sha in hashes.items()},
        "lineage": lineage,
        **extra,
    }
    write_json(meta_file, meta)
    return meta
