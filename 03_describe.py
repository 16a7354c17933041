"""Stage 03 — describe every neuron's mosaic in words, with a prompt fitted to the layer's depth.

Reads, in the run folder (--run), 02_mosaics.csv (+ the mosaic PNGs), 01_activations.npz and
01_predictions.csv. Writes 03_descriptions.csv (layer, channel, level, description, backend,
model, status, reason) and 03_describe.meta.json.

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
  python 03_describe.py --run data/demo --backend offline
"""
from __future__ import annotations

import argparse

from common.artefacts import Run
from common.cli import (add_run, add_settings, exit_on_stage_error, parse_shard, settings_from,
                        stage_parser, start_stage)
from common.describers import DescriberSettings, describe


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of stage 03: ``--run``, then the describer's settings."""
    p = stage_parser(__doc__.split("\n")[0])
    add_run(p, "02_mosaics.csv, 01_activations.npz and 01_predictions.csv",
            "03_descriptions.csv and its journal")
    p.add_argument("--skip-dead", action="store_true", help="leave out neurons the triage flags "
                   "as dead or barely active (common/triage.py; reads 01_stats/)")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), help="describe only share i of N")
    p.add_argument("--merge", action="store_true", help="only assemble the shards' journals")
    add_settings(p, DescriberSettings)
    return p


def run(run: Run, settings: DescriberSettings = DescriberSettings(), **options
        ) -> list[dict] | None:
    """Describe the mosaics of ``run`` into its 03_descriptions.csv (``common.describers.describe``;
    its ``options``: describer, shard, merge_only, skip_dead, args)."""
    return describe(run.mosaics, run.descriptions, settings, run.activations, run.predictions,
                    **options)


@exit_on_stage_error
def main(argv=None):
    """Parse flags and describe the neurons."""
    args = start_stage(build_parser(), argv, keep_memory=True)
    run(Run(args.run), settings_from(DescriberSettings, args), shard=args.shard,
        merge_only=args.merge, skip_dead=args.skip_dead, args=vars(args))


if __name__ == "__main__":
    main()
