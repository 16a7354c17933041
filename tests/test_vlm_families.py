"""The hf describer on a tiny random model of each vision-language family (tests/tiny_vlms.py,
nothing downloaded): the family's own prompt form, one sentence per neuron, a batch answering
as one neuron at a time does, the prompt holding as many image tokens as the model consumes
features, and the answer alone decoded for decoder-only and encoder-decoder models. Then what
happens when generation fails: a failed batch is retried neuron by neuron, and a model that
fails on everything stops the stage with one line."""
import json
import logging
import types

import pytest
import torch

import tiny_vlms
from common import describers as D
from common.cli import StageError
from common.journal import read_journals
from test_describe import FakeVLM, make_run, run_stage

# family → (builder in tiny_vlms, its options, image token, tokens per image, prompt form).
# Tokens per image follow from each tiny config: LLaVA 4 × 4 patches (CLS dropped); LLaVA-NeXT
# and -OneVision a base view and one tile of 4 × 4 patches each, plus a newline per tile row
# (16 + 16 + 4); Qwen2(.5)-VL
# 4 × 4 patches merged 2 × 2; SmolVLM/Idefics3 16 patches shuffled by 2 → 4; Gemma 3 pooled to
# 2 × 2; mllama one <|image|> (features enter by cross-attention); PaliGemma 16 patches;
# BLIP-2/InstructBLIP 4 queries; Florence-2 one 1 × 1 map + its pooled token.
FAMILIES = {
    "llava": ("llava", {}, "<image>", 16, "chat"),
    "llava_next": ("llava_next", {}, "<image>", 36, "chat"),
    "llava_onevision": ("llava_onevision", {}, "<image>", 36, "chat"),
    "qwen2_vl": ("qwen2_vl", {}, "<|image_pad|>", 4, "chat"),
    "qwen2_5_vl": ("qwen2_vl", {"family": "qwen2_5_vl"}, "<|image_pad|>", 4, "chat"),
    "smolvlm": ("smolvlm", {}, "<image>", 4, "chat"),
    "idefics3": ("smolvlm", {"family": "idefics3"}, "<image>", 4, "chat"),
    "gemma3": ("gemma3", {}, "<image_soft_token>", 4, "chat"),
    "mllama": ("mllama", {}, "<|image|>", 1, "chat"),
    "paligemma": ("paligemma", {}, "<image>", 16, "answer en "),
    "blip2": ("blip2", {}, "<image>", 4, "Question: "),
    "blip2-t5": ("blip2", {"text": "t5"}, "<image>", 4, "Question: "),
    "instructblip": ("instructblip", {}, "<image>", 4, ""),
    "florence2": ("florence2", {}, "<image>", 2, "<MORE_DETAILED_CAPTION>"),
}
ENCODER_DECODER = {"blip2-t5", "florence2"}
NEW_TOKENS = 2  # answer length: enough to tell answers apart, short to keep the tests quick


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(family name, its tiny model loaded by HFDescriber), built once per test run."""
    name = request.param
    builder, options = FAMILIES[name][:2]
    folder = tmp_path_factory.mktemp(name)
    getattr(tiny_vlms, builder)(folder, **options)
    return name, D.HFDescriber(str(folder), device="cpu", batch_size=3, temperature=0,
                               max_new_tokens=NEW_TOKENS)


def test_family_prompt_batch_and_image_tokens(family, tmp_path):
    """Per family: its prompt form (chat template or its plain prompt, the layer's prompt in
    it where it reads one); through the stage, one batch of three neurons (three prompts of
    different lengths) each answered with a sentence of at most NEW_TOKENS words and no echo of
    the prompt (encoder-decoder models included), equal to their answers one at a time; each
    prompt row holding the image tokens the model's features fill."""
    name, hf = family
    _, _, image_token, per_image, form = FAMILIES[name]
    text = hf.prompt_text("describe the stripes")
    if form == "chat":
        assert text.startswith("USER: ") and text.endswith("ASSISTANT:")
        assert "describe the stripes" in text
    else:
        assert hf.processor.chat_template is None and form in text
        assert ("describe the stripes" in text) == (name != "florence2")  # task tokens only
    assert hf.model.config.is_encoder_decoder == (name in ENCODER_DECODER)
    run = make_run(tmp_path, channels=1)
    rows = run_stage(run, describer=hf)
    assert {r["status"] for r in rows} == {"ok"} and {r["model"] for r in rows} == {
        hf.model_label}
    for r in rows:
        assert 1 <= len(r["description"].split()) <= NEW_TOKENS and "USER" not in r["description"]
    neurons, _ = D.make_neurons(run / "02_mosaics.csv", D.load_prompts(D.DEFAULT_PROMPTS), "",
                                "", "", run / "01_activations.npz")
    assert len({n.prompt for n in neurons}) == 3
    single = [hf.describe([n])[0] for n in neurons]
    assert [r["description"] for r in rows] == [D.clean_answer(raw)[0] for raw, _ in single]
    images = [D.load_mosaic(n.mosaic) for n in neurons]
    ids = hf.inputs(images, [n.prompt for n in neurons])["input_ids"]
    token_id = hf.processor.tokenizer.convert_tokens_to_ids(image_token)
    assert (ids == token_id).sum(dim=1).tolist() == [per_image] * len(neurons)


# --- failures --------------------------------------------------------------------------------

class Flaky:
    """Stands in for HFDescriber.generate: fails any batch holding a prompt of ``bad`` levels
    with ValueError (as a processor rejecting its input), else answers per prompt."""

    def __init__(self, bad_levels):
        """``bad_levels``: the level numbers whose prompt makes generation fail."""
        self.bad = bad_levels
        self.calls = []

    def __call__(self, images, prompts):
        """Record the batch size; fail or answer."""
        self.calls.append(len(prompts))
        if any(p in self.bad for p in prompts):
            raise ValueError("The number of <image> tokens in each prompt should be the same")
        return [f"a sentence about {len(p)} characters" for p in prompts]


def _hf_without_model(generate, label="tiny/model"):
    """An HFDescriber whose generation is ``generate`` (no model loaded: only the failure
    handling is under test)."""
    hf = D.HFDescriber.__new__(D.HFDescriber)
    hf.batch_size, hf.model_label, hf.generate = 8, label, generate
    hf.model = types.SimpleNamespace(device=torch.device("cpu"))
    return hf


def test_failed_batch_is_retried_one_by_one_and_the_stage_finishes(tmp_path, caplog):
    """The batch holding one bad neuron is tried again neuron by neuron: that neuron alone is
    failed with the processor's message, the stage finishes, says how many failed, and the
    next run asks again for that neuron only."""
    run = make_run(tmp_path, channels=2)
    prompts = D.load_prompts(D.DEFAULT_PROMPTS)
    deep = D.build_prompt(prompts, len(prompts["levels"]))
    flaky = Flaky({deep})
    hf = _hf_without_model(flaky)
    caplog.set_level(logging.WARNING)
    rows = run_stage(run, describer=hf, batch_size=6)
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["layer"], r["channel"]) for r in failed] == [("deep", 0), ("deep", 1)]
    assert all(r["reason"] == "generation failed: ValueError: The number of <image> tokens in "
               "each prompt should be the same" for r in failed)
    assert flaky.calls == [6, 1, 1, 1, 1, 1, 1]
    assert "2 of 6 neurons have no description" in caplog.text
    meta = json.loads((run / "03_describe.meta.json").read_text())
    assert meta["n_failed"] == 2 and meta["n_ok"] == 4
    again = Flaky(set())
    run_stage(run, describer=_hf_without_model(again), batch_size=6)
    assert again.calls == [2]


def test_unreadable_mosaic_fails_only_its_neuron(tmp_path):
    """A mosaic that cannot be read fails its own neuron (OSError named) inside a batch."""
    run = make_run(tmp_path, channels=1)
    (run / "02_mosaics" / "mid" / "0.png").write_bytes(b"not a png")
    rows = run_stage(run, describer=_hf_without_model(Flaky(set())), batch_size=3)
    status = {r["layer"]: (r["status"], r["reason"]) for r in rows}
    assert status["early"] == ("ok", "") and status["deep"] == ("ok", "")
    assert status["mid"][0] == "failed" and "UnidentifiedImageError" in status["mid"][1]


def test_failure_of_every_neuron_stops_with_model_and_cause(tmp_path):
    """A model that fails on every neuron of the first batch stops the stage with one line
    naming the model and the cause; the journal keeps the failures (retried next time)."""
    run = make_run(tmp_path, channels=2)
    hf = _hf_without_model(Flaky(set()), label="my/broken-vlm")
    hf.generate = lambda images, prompts: (_ for _ in ()).throw(
        KeyError("'pixel_values'"))
    with pytest.raises(StageError) as err:
        run_stage(run, describer=hf, batch_size=4)
    message = str(err.value)
    assert "\n" not in message and "my/broken-vlm (hf)" in message
    assert "failed on all 4 neurons" in message and "KeyError" in message
    records = read_journals(run / "03_descriptions.csv")
    assert len(records) == 4 and all(r[-1]["error"].startswith("generation failed: KeyError")
                                     for r in records.values())
    assert not (run / "03_descriptions.csv").exists()


def test_a_rerun_of_failed_neurons_alone_finishes_when_they_fail_again(tmp_path):
    """Once other neurons are described, a rerun that asks again for the failed ones writes the
    CSV even when all of them fail again (a bad mosaic stays bad): make is not stopped."""
    run = make_run(tmp_path, channels=3)
    first = run_stage(run, describer=FakeVLM(fail=[("mid", 1), ("deep", 2)]))
    assert sum(r["status"] == "failed" for r in first) == 2
    again = FakeVLM(fail=[("mid", 1), ("deep", 2)])
    rows = run_stage(run, describer=again)
    assert again.described == [("mid", 1), ("deep", 2)]
    assert len(rows) == 9 and sum(r["status"] == "failed" for r in rows) == 2


def test_empty_answers_of_every_neuron_stop_too(tmp_path):
    """Answers that all clean to nothing (the symptom of decoding the wrong tokens) count as
    failures of every neuron."""
    run = make_run(tmp_path, channels=1)
    hf = _hf_without_model(lambda images, prompts: [""] * len(prompts))
    with pytest.raises(StageError, match=r"failed on all 3 neurons .*3 × empty answer"):
        run_stage(run, describer=hf, batch_size=3)


def test_unknown_family_without_template_gets_the_plain_prompt(caplog):
    """A processor without a chat template of a family not in the table gets the layer's
    prompt as it is, with a warning; the known plain families keep their forms."""
    hf = D.HFDescriber.__new__(D.HFDescriber)
    hf.processor = type("P", (), {"image_token": "<img>"})()
    hf.plain = D.PLAIN_PROMPTS["paligemma"]
    assert hf.prompt_text("what {is} it") == "<img>answer en what {is} it"
    hf.plain = "{prompt}"
    assert hf.prompt_text("what") == "what"
    assert set(D.PLAIN_PROMPTS) == {"paligemma", "blip-2", "instructblip", "florence2"}
    assert all(("{prompt}" in v) != (k == "florence2") for k, v in D.PLAIN_PROMPTS.items())


def test_stage_cli_with_a_model_folder(tmp_path):
    """`03_describe.py --backend hf --model <folder>` (what `make … DESCRIBER=hf VLM=<folder>`
    runs) describes every neuron with a plain-prompt encoder-decoder family, and a folder that
    holds no model stops with exit status 2 instead of a traceback."""
    from common.artefacts import read_descriptions
    from conftest import load_stage
    stage = load_stage("03_describe")
    folder = tiny_vlms.florence2(tmp_path / "florence2")
    run = make_run(tmp_path, channels=1)
    args = ["--run", str(run), "--backend", "hf", "--device", "cpu", "--batch-size", "3",
            "--temperature", "0", "--max-new-tokens", "2"]
    stage.main(args + ["--model", str(folder)])
    rows = read_descriptions(run / "03_descriptions.csv")
    assert len(rows) == 3 and all(r.ok and r.model == str(folder) for r in rows)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        stage.main(args + ["--model", str(tmp_path / "empty")])
    assert stop.value.code == 2
