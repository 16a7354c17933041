"""Sentences for mosaics that are not a single neuron's: 03_describe.py run on a mosaic index.

11 describes baskets of neurons and their unions and differences this way: it writes an index in
02's format (``layer, channel, path, n_tiles, grid, tile_px, crop``), naming each mosaic by a
pseudo-layer and a number, and runs 03 itself on it with the run's describer arguments, so that
every sentence of a run comes from one describer (09 does the same for sub-concepts, concurrently).
"""
from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from pathlib import Path

from common.cli import StageError
from common.artefacts import read_descriptions, read_mosaics

log = logging.getLogger("neuron-atlas.describing")

ROOT = Path(__file__).resolve().parents[1]


def describe_index(index: Path, out: Path, describe_args: str,
                   levels: dict[str, int]) -> dict[tuple[str, int], str]:
    """Run 03_describe.py on the mosaics of ``index`` with ``describe_args``, writing ``out``.

    ``levels`` maps each pseudo-layer of the index to the abstraction level 03 should use (that of
    the real layer it stands for). Returns (pseudo-layer, channel) → sentence ("" where 03 failed).
    """
    command = [sys.executable, str(ROOT / "03_describe.py"), "--mosaics", str(index),
               "--out", str(out), *shlex.split(describe_args)]
    if levels:
        command += ["--levels", ",".join(f"{name}={level}" for name, level in levels.items())]
    log.info("describing %d mosaics of %s with 03_describe.py", len(read_mosaics(index)), index)
    result = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if result.returncode != 0:
        raise StageError(f"03_describe.py failed on the mosaics of {index}:\n"
                         f"{result.stderr[-2000:]}")
    return {d.key: d.description if d.status == "ok" else "" for d in read_descriptions(out)}
