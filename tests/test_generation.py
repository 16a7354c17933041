"""GENERATOR=diffusers (common/generation.py): images of a concept rendered by a text-to-image
pipeline and the analysed network's response to them. The pipeline is a tiny, randomly
initialised Stable Diffusion built here and saved to a folder, so nothing is downloaded."""
import numpy as np
import pytest
import torch
from PIL import Image

from common.cli import StageError
from common.generation import Renderer, concept_seed, responses

@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A folder holding a 16-px Stable Diffusion pipeline with random weights."""
    from tiny_vlms import tiny_diffusion
    return tiny_diffusion(tmp_path_factory.mktemp("tiny-sd"))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_renders_n_seeded_images_per_concept_independent_of_the_others(tiny_pipeline):
    renderer = Renderer.load(str(tiny_pipeline), device="cpu", steps=1, size=16)
    assert renderer.guidance == 0.0  # one step: a distilled model, run without guidance
    first = renderer.render(["red stripes", "a dog", "red stripes"], n=2, seed=0, batch=3)
    assert list(first) == ["red stripes", "a dog"]  # a repeated concept is rendered once
    assert all(len(images) == 2 and all(im.size == (16, 16) and im.mode == "RGB"
                                        for im in images) for images in first.values())
    # Each image has its own seed: the two images of a concept differ.
    assert np.abs(pixels(first["red stripes"][0]) - pixels(first["red stripes"][1])).max() > 0
    # A concept's images depend on the run's seed and its words only, not on its companions,
    # their order or the batch size.
    again = renderer.render(["blue sky", "red stripes"], n=2, seed=0, batch=1)
    for a, b in zip(first["red stripes"], again["red stripes"]):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    other = renderer.render(["red stripes"], n=1, seed=1)
    assert np.abs(pixels(other["red stripes"][0]) - pixels(first["red stripes"][0])).max() > 0
    assert concept_seed(0, "Red  stripes", 1) == concept_seed(0, "red stripes", 1)
    assert concept_seed(0, "red stripes", 1) != concept_seed(0, "red stripes", 2)


def test_guidance_is_used_by_many_step_models(tiny_pipeline):
    assert Renderer.load(str(tiny_pipeline), device="cpu", steps=20).guidance > 1.0


def test_a_model_that_is_not_on_disk_or_zero_steps_stops_with_the_fix(tmp_path, tiny_pipeline):
    with pytest.raises(StageError, match="GENERATOR_MODEL.*huggingface-cli download"):
        Renderer.load(str(tmp_path / "no-such-pipeline"), device="cpu")
    with pytest.raises(StageError, match="GENERATE_STEPS=0"):
        Renderer.load(str(tiny_pipeline), device="cpu", steps=0)


def test_responses_are_each_neurons_maximum_as_01_measures_it(fake_bundle):
    """The network's per-image maximum on rendered images equals a forward pass written out by
    hand with torchvision's own preprocessing."""
    from torchvision import transforms
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8))
              for i in range(3)]
    found = responses(fake_bundle, images, ["relu1", "conv2"], batch=2)
    net = fake_bundle.model
    prep = transforms.Compose([transforms.Resize(32, transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(32),
                               transforms.ToTensor(),
                               transforms.Normalize(fake_bundle.mean, fake_bundle.std)])
    with torch.no_grad():
        x = torch.stack([prep(im) for im in images])
        relu1 = torch.relu(net.conv1(x))
        conv2 = net.conv2(net.pool(relu1))
    assert found["relu1"].shape == (3, 4) and found["conv2"].shape == (3, 2)
    np.testing.assert_allclose(found["relu1"], relu1.amax(dim=(2, 3)).numpy(), atol=2e-3)
    np.testing.assert_allclose(found["conv2"], conv2.amax(dim=(2, 3)).numpy(), atol=2e-3)
