"""Stage 03 — describe every neuron's mosaic in words, with a prompt fitted to the layer's depth.

Reads 02_mosaics.csv (+ the mosaic PNGs), 01_activations.npz and 01_predictions.csv.
Writes 03_descriptions.csv (layer, channel, level, description, backend, model, status, reason)
and 03_describe.meta.json.

The describers are a library (common/describers.py, with the offline one in
common/offline_describer.py); this stage runs them on 02's mosaics. Backends (--backend):
  offline  deterministic text from what can be measured (default; no model download needed):
           the crops' appearance for early layers, what the top images are for deep layers
           (in the analysed model's own class names), both for the middle layers.
  hf       any Hugging Face image-text-to-text model (local folder or hub id), batched.
  openai   any OpenAI-compatible chat-completions server with image input (vLLM, Ollama, …);
           the API key is read from the environment variable named by --api-key-env.

Progress is appended to a journal beside the output (03_descriptions.part-<i>-of-<N>.jsonl),
one line per answer as it arrives, so an interrupted run loses nothing: a rerun skips neurons
already described with the same inputs, backend, model and prompt, and retries the failed ones
(a line torn by a kill or a full disk is dropped, logged, and its neuron described again). While
a VLM backend leaves neurons failed, the CSV is written for the later stages but the stage stays
out of date for make (its meta gets an old timestamp), so the next `make all` retries them.
With --shard i/N each machine describes its share; the run that completes the set (or
--merge) writes 03_descriptions.csv.

Example:
  python 03_describe.py --mosaics data/demo/02_mosaics.csv \
      --activations data/demo/01_activations.npz --predictions data/demo/01_predictions.csv \
      --out data/demo/03_descriptions.csv --backend offline
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import (add_settings, exit_on_stage_error, parse_shard, settings_from,
                        stage_parser, start_stage)
from common.describers import DescriberSettings, describe


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of stage 03: its files, then the describer's settings."""
    p = stage_parser(__doc__.split("\n")[0])
    p.add_argument("--mosaics", required=True, help="02_mosaics.csv")
    p.add_argument("--activations", default=None, help="01_activations.npz (layer order, top "
                   "images; needed by the offline backend)")
    p.add_argument("--predictions", default=None, help="01_predictions.csv (offline backend)")
    p.add_argument("--out", required=True, help="03_descriptions.csv to write")
    p.add_argument("--skip-dead", action="store_true", help="leave out neurons the triage flags "
                   "as dead or barely active (common/triage.py; needs --activations, reads the "
                   "01_stats/ beside it)")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), help="describe only share i of N")
    p.add_argument("--merge", action="store_true", help="only assemble the shards' journals")
    add_settings(p, DescriberSettings)
    return p


def run(mosaics: Path, out: Path, settings: DescriberSettings = DescriberSettings(),
        activations: Path | None = None, predictions: Path | None = None, **options
        ) -> list[dict] | None:
    """Describe the mosaics of ``mosaics`` into ``out`` (``common.describers.describe``; its
    ``options``: describer, shard, merge_only, skip_dead, args)."""
    return describe(mosaics, out, settings, activations, predictions, **options)


@exit_on_stage_error
def main(argv=None):
    """Parse flags and describe the neurons."""
    args = start_stage(build_parser(), argv, keep_memory=True)
    run(Path(args.mosaics), Path(args.out), settings_from(DescriberSettings, args),
        activations=Path(args.activations) if args.activations else None,
        predictions=Path(args.predictions) if args.predictions else None,
        shard=args.shard, merge_only=args.merge, skip_dead=args.skip_dead, args=vars(args))


if __name__ == "__main__":
    main()
