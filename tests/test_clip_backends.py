"""The CLIP side with every library a researcher may bring: clip-anytorch, OpenCLIP, and
transformers' CLIP and SigLIP, each a tiny random model built and saved here (nothing is
downloaded), loaded by name through ``common.embedders`` the way 04, 07 and 09 load them; the
``clip`` matcher scores images with the towers of each."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_vlms
from common import embedders as E
from common.matchers import ClipMatcher
from common.search import loader_name

OPEN_CLIP_TINY = {"embed_dim": 12,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8,
                                 "head_width": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                               "heads": 2, "layers": 1}}


def _clip_anytorch(folder):
    """A tiny random clip-anytorch CLIP saved as a state dict (clip.load infers its shape: one
    head per 64 channels in both towers)."""
    from clip.model import CLIP
    torch.manual_seed(0)
    model = CLIP(embed_dim=12, image_resolution=32, vision_layers=1, vision_width=64,
                 vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=64,
                 transformer_heads=1, transformer_layers=1)
    path = folder / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return f"clip:{path}"


def _open_clip(folder):
    """A tiny random OpenCLIP model: its architecture registered from a JSON config (as a
    custom one is), its weights saved as a checkpoint file."""
    import open_clip
    (folder / "configs").mkdir()
    (folder / "configs" / "tiny-atlas-clip.json").write_text(json.dumps(OPEN_CLIP_TINY))
    open_clip.add_model_config(folder / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-atlas-clip")
    path = folder / "tiny-open-clip.pt"
    torch.save(model.state_dict(), path)
    return f"clip:open_clip:tiny-atlas-clip:{path}"


def _hf(family):
    """Builder of a transformers CLIP or SigLIP folder, named for load_clip_towers."""
    def build(folder):
        """Save the tiny model into ``folder``; its loader name."""
        tiny_vlms.hf_dual_encoder(folder, family)
        return f"clip:hf:{folder}"
    return build


BACKENDS = {"clip-anytorch": (_clip_anytorch, 12), "open_clip": (_open_clip, 12),
            "hf-clip": (_hf("clip"), 12), "hf-siglip": (_hf("siglip"), 16)}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request, tmp_path_factory):
    """(library, loader name, its dimension), the model built once per test run."""
    build, dim = BACKENDS[request.param]
    return request.param, build(tmp_path_factory.mktemp(request.param)), dim


def _images(folder):
    """Three small images on disk: red, a stripe pattern, blue."""
    stripes = np.zeros((40, 40, 3), np.uint8)
    stripes[::4] = 255
    paths = []
    for i, pixels in enumerate([np.full((40, 40, 3), (255, 0, 0), np.uint8), stripes,
                                np.full((40, 40, 3), (0, 0, 255), np.uint8)]):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def test_towers_share_a_space_and_reload_from_the_recorded_name(backend):
    """Both towers of one model: unit vectors of its joint dimension, one space (so 04 fuses by
    mean); the name 04 records loads the same model again (07 does), with the same vectors;
    different sentences and images get different vectors."""
    library, name, dim = backend
    text, image = E.load_clip_towers(name, "cpu")
    t = text.encode(["red stripes", "a dog"])
    v = image.encode([Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (50, 30))])
    assert t.shape == (2, dim) and v.shape == (2, dim)
    assert np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert not np.allclose(t[0], t[1]) and not np.allclose(v[0], v[1])
    assert E.same_space(text, image)
    again = E.load_text_embedder(loader_name(text.name, "text"), "cpu")
    image_again = E.load_image_embedder(loader_name(image.name, "image"), "cpu")
    assert E.same_space(again, image_again) and again.space_id == text.space_id
    assert np.allclose(again.encode(["red stripes"]), t[:1], atol=1e-6)
    assert np.allclose(image_again.encode([Image.new("RGB", (40, 40), (255, 0, 0))]), v[:1],
                       atol=1e-6)


def test_clip_matcher_scores_are_the_towers_cosines(backend, tmp_path):
    """The clip matcher's score of image i for sentence j is the cosine of their vectors."""
    _, name, _ = backend
    matcher = ClipMatcher.load(name, "cpu")
    paths = _images(tmp_path)
    sentences = ["red", "black white stripes", "blue"]
    scores = matcher.score({"layer": sentences}, paths, input_size=32)["layer"]
    from common.matchers import network_inputs
    pixels = [Image.fromarray(p) for _, p in network_inputs(paths, 32)]
    expected = matcher.image_tower.encode(pixels) @ matcher.text_tower.encode(sentences).T
    assert scores.shape == (3, 3) and np.allclose(scores, expected, atol=1e-5)
    assert np.ptp(scores) > 0


def test_hf_model_that_is_not_a_dual_encoder_is_refused(tmp_path):
    """A vision-language model named as a CLIP is refused with what it is."""
    from common.cli import StageError
    folder = tiny_vlms.llava(tmp_path / "llava")
    with pytest.raises(StageError, match="not a dual text-image encoder"):
        E.load_clip_towers(f"clip:hf:{folder}", "cpu")


def test_open_clip_needs_a_checkpoint_file(tmp_path):
    """An OpenCLIP name without an existing checkpoint says how to name one."""
    from common.cli import StageError
    with pytest.raises(StageError, match="clip:open_clip:<architecture>:<checkpoint"):
        E.load_clip_towers(f"clip:open_clip:ViT-B-32:{tmp_path / 'missing.bin'}", "cpu")


def test_09_verifies_with_the_model_its_matcher_names(backend, tmp_path):
    """09's ``--matcher clip:<model>`` loads that model's two towers, whichever library it is
    from; a matcher name that is none of offline, clip, clip:<model> is refused before any
    input is read."""
    from common.artefacts import Run
    from common.cli import StageError
    from conftest import load_stage
    score = load_stage("09_score")
    _, name, _ = backend
    matcher = score.load_matcher(f"clip:{name}", None, "", "cpu", 1)
    assert isinstance(matcher, ClipMatcher)
    assert matcher.text_tower.space_id == E.load_clip_towers(name, "cpu")[0].space_id
    with pytest.raises(StageError, match="--matcher 'siglip'"):
        score.run(Run(tmp_path), score.Settings(matcher="siglip"))
