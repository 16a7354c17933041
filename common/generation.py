"""Images of a concept, made to order (GENERATOR=diffusers): DnR and SIEVE render pictures of a
candidate concept with a text-to-image model and measure how strongly a neuron fires on them.

The default way to get images of a concept is to *retrieve* them — the held-out images the
concept matcher ranks highest (common/matchers.py) — which needs no extra model. This module is
the other way: a ``diffusers`` text-to-image pipeline renders ``n`` images per concept, each from
its own seed (derived from the run's seed and the concept's words, so that the images of a
concept do not depend on which other concepts are rendered or in what order), in batches, on the
GPU when there is one. ``responses`` then runs the analysed network over them and returns each
neuron's per-image maximum, the same number stage 01 keeps for the run's own images, so that a
generated image can be held against the neuron's thresholds measured on real ones.

Which pipeline: any folder or Hugging Face id that ``diffusers.AutoPipelineForText2Image``
loads. Distilled one-step models (SD-Turbo class) are the practical choice: the README gives the
cost. Weights are never downloaded here: a model that is not on disk stops with the command that
fetches it.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from common.cli import StageError, setting

log = logging.getLogger(__name__)

GENERATORS = ("retrieve", "diffusers")  # how images of a concept are found
DISTILLED_STEPS = 4  # at most this many denoising steps: a distilled model, run without guidance
GUIDANCE = 7.5       # classifier-free guidance of an ordinary (many-step) pipeline


@dataclass(frozen=True)
class GeneratorSettings:
    """Settings of a stage that takes images of a concept (09's Activation Rate, 13's model
    test), inherited by its ``Settings``: one spelling of the four flags for both."""

    generator: str = setting(
        "retrieve", "images of a concept: retrieve (the run's images the matcher ranks highest) "
        "or diffusers (rendered by a text-to-image model, as DnR, SIEVE and SemanticLens do)",
        make="GENERATOR", choices=GENERATORS)
    generator_model: str = setting(
        "stabilityai/sd-turbo", "diffusers: the text-to-image pipeline, a folder or a Hugging "
        "Face id in the local cache", make="GENERATOR_MODEL")
    generate_n: int = setting(8, "diffusers: images rendered per concept", make="GENERATE_N")
    generate_steps: int = setting(
        1, "diffusers: denoising steps (at most 4: a distilled model, run without guidance)",
        make="GENERATE_STEPS")

    def renderer(self, device: str) -> "Renderer":
        """The pipeline these settings name, loaded on ``device``."""
        return Renderer.load(self.generator_model, device, self.generate_steps)

    def described(self) -> dict:
        """What a meta records of rendered images."""
        return {"images": "generated", "generator": "diffusers", "model": self.generator_model,
                "per_concept": self.generate_n, "steps": self.generate_steps}


def concept_seed(seed: int, concept: str, index: int) -> int:
    """The seed of the ``index``-th image of ``concept``: fixed by the run's ``seed`` and the
    concept's words alone."""
    return zlib.crc32(f"{seed}\0{' '.join(concept.split()).casefold()}\0{index}".encode())


@dataclass
class Renderer:
    """A loaded text-to-image pipeline and how it is run."""

    pipeline: object
    steps: int
    size: int | None = None  # side of the rendered images (None: the pipeline's own)

    @classmethod
    def load(cls, model: str, device: str = "auto", steps: int = 1,
             size: int | None = None) -> "Renderer":
        """Load the ``diffusers`` pipeline ``model`` (a folder, or a Hugging Face id already in
        the local cache) onto ``device``; half precision on a GPU."""
        try:
            import torch
            from diffusers import AutoPipelineForText2Image
        except ImportError:
            raise StageError("GENERATOR=diffusers needs the diffusers package: "
                             ".venv/bin/pip install diffusers (or run `make venv`)") from None
        if steps < 1:
            raise StageError(f"GENERATE_STEPS={steps}: give at least 1 denoising step")
        from common.models import pick_device
        where = pick_device(device)
        dtype = torch.float16 if where.type == "cuda" else torch.float32
        try:
            pipeline = AutoPipelineForText2Image.from_pretrained(model, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise StageError(
                f"cannot load the text-to-image model {model!r} ({str(err).splitlines()[0][:120]})"
                f": give GENERATOR_MODEL a folder holding a diffusers pipeline, or fetch one first "
                f"on a machine with internet, e.g. `huggingface-cli download stabilityai/sd-turbo`"
            ) from None
        pipeline = pipeline.to(where)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, steps, size)

    @property
    def guidance(self) -> float:
        """Classifier-free guidance: none for a distilled few-step model, the usual 7.5 else."""
        return 0.0 if self.steps <= DISTILLED_STEPS else GUIDANCE

    def render(self, concepts: Sequence[str], n: int, seed: int = 0,
               batch: int = 8) -> dict[str, list]:
        """``n`` PIL images of each concept (prompt: the concept's words), batched ``batch``
        images per call, each from ``concept_seed``. Concepts repeated in ``concepts`` are
        rendered once."""
        import torch
        unique = list(dict.fromkeys(concepts))
        jobs = [(c, i) for c in unique for i in range(n)]
        images: dict[str, list] = {c: [] for c in unique}
        device = getattr(self.pipeline, "device", torch.device("cpu"))
        generator_device = "cpu" if device.type == "mps" else device
        size = {"height": self.size, "width": self.size} if self.size else {}
        for start in range(0, len(jobs), max(1, batch)):
            chunk = jobs[start:start + max(1, batch)]
            generators = [torch.Generator(device=generator_device).manual_seed(
                concept_seed(seed, c, i)) for c, i in chunk]
            out = self.pipeline(prompt=[c for c, _ in chunk], num_inference_steps=self.steps,
                                guidance_scale=self.guidance, generator=generators,
                                output_type="pil", **size)
            for (concept, _), image in zip(chunk, out.images):
                images[concept].append(image.convert("RGB"))
        return images


def model_inputs(bundle, images: Sequence):
    """PIL ``images`` as the analysed network's input batch (n × C × H × W, on the CPU): resized
    and centre-cropped to its input side and normalised as 01 does the run's images."""
    import torch
    from common.images import network_input, to_tensor
    return torch.stack([to_tensor(network_input(im, bundle.input_size), bundle.mean, bundle.std)
                        for im in images])


def responses(bundle, images: Sequence, layers: Sequence[str], batch: int = 32
              ) -> dict[str, np.ndarray]:
    """Each neuron's maximum over its map on each of ``images`` (PIL), as stage 01 measures it:
    the image resized and centre-cropped to the network's input, normalised as the run's images
    are; ``bundle`` is the analysed model (common.models.ModelBundle). → layer → images ×
    channels (float32)."""
    import torch
    from common.hooks import read_layouts, reduce_outputs
    side = bundle.input_size
    layouts = read_layouts(bundle.model, layers, (side, side), bundle.channels, bundle.n_outputs,
                           bundle.shapes)

    def maximum(name):
        layout = layouts[name]
        return lambda out: layout.to_grid(out.detach()).float().flatten(2).amax(dim=2).cpu()

    found: dict[str, list] = {name: [] for name in layers}
    with reduce_outputs(bundle.model, layers, {name: maximum(name) for name in layers},
                        warn_repeats=False) as outputs, torch.inference_mode():
        for start in range(0, len(images), max(1, batch)):
            bundle.model(model_inputs(bundle, images[start:start + max(1, batch)])
                         .to(bundle.device))
            for name in layers:
                found[name].append(outputs[name].numpy())
    return {name: (np.concatenate(parts).astype(np.float32) if parts
                   else np.zeros((0, layouts[name].channels), np.float32))
            for name, parts in found.items()}
